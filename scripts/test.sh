#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest in two
# workers: the Slurm tests beside the rest (tests/conftest.py; -n 0 runs in one process).
# Extra arguments go to pytest (e.g. scripts/test.sh -k restore -x).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/setup.sh"
"$here/scripts/test-packages.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest -ra --durations=25 --timeout=600 -n 2 --dist loadgroup "$@" tests
