#!/usr/bin/env bash
# The main job on a local default, on a fresh machine: installs what it needs, then a
# real computation is checkpointed, killed and resumed to its exact answer.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
exec "$here/.venv/bin/python" scripts/demo.py
