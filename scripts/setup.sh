#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, a venv, hpcckpt itself.
# Sourced by demo.sh and test.sh; prints what it installs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
need_apt=()
# command -> Debian package: compilers for the test programs, bzip2 and make for the tree
# tests, ip for the two-node migration test, munge for its authentication, pgrep, nft for
# the network lock of TCP connections (engine/tcp.py)
for pair in gcc:gcc make:make bzip2:bzip2 ip:iproute2 munged:munge pgrep:procps nft:nftables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
dpkg -s libc6-dev >/dev/null 2>&1 || need_apt+=(libc6-dev)
dpkg -s python3-venv >/dev/null 2>&1 || python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(sha1sum "$here/setup.py" | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  echo "setup: pip install -e .[test,bench]"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[test,bench]"
  touch "$stamp"
fi
