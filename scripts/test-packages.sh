#!/usr/bin/env bash
# Debian packages the tests run (servers, terminals, Slurm, QEMU), installed before pytest
# starts: the test fixtures would install them too, but two test workers must not run
# apt-get at the same moment.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
packages=(tmux nftables redis-server redis-tools munge qemu-system-x86 busybox-static sqlite3
          slurmctld slurmd slurm-client libslurm-dev
          nginx apache2-utils curl mariadb-server mariadb-client openssh-server openssh-client)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "test-packages: apt-get install ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
