#!/usr/bin/env bash
# Build the hpcckpt SPANK plugin against the installed Slurm's headers.
#
#   slurm_plugin/build.sh [OUT_DIR]     -> OUT_DIR/hpcckpt_spank.so (default: slurm_plugin/)
#
# Installs Debian's libslurm-dev (the headers; the .so itself needs no libslurm at run
# time beyond what slurmstepd/sbatch already load) and gcc when missing. The plugin must
# be built for the Slurm release it runs under: Slurm refuses a plugin whose
# SPANK_PLUGIN version or symbol set does not match.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here}
missing=()
dpkg-query -W -f '${Status}' libslurm-dev 2>/dev/null | grep -q 'ok installed' || missing+=(libslurm-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "build.sh: need root to apt-get install ${missing[*]}" >&2; exit 1; }
  echo "build.sh: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p "$out"
gcc -std=gnu11 -Wall -Wextra -Werror -O2 -fPIC -shared \
  -o "$out/hpcckpt_spank.so.tmp" "$here/hpcckpt_spank.c"
mv "$out/hpcckpt_spank.so.tmp" "$out/hpcckpt_spank.so"
echo "$out/hpcckpt_spank.so"
