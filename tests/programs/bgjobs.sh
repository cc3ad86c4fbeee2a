#!/bin/bash
# Background jobs and `wait`: three subshells each writing their own file.
# Usage: bgjobs.sh STEPS PAUSE
for i in 1 2 3; do
  ( for j in $(seq "$1"); do echo "job$i $j $((j * i))"; sleep "$2"; done ) > "out$i.txt" &
done
wait
echo "all done" > done.txt
