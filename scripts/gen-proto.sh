#!/usr/bin/env bash
# Regenerate hpcckpt/images/*_pb2.py from the .proto files (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/../hpcckpt/images"
for p in *.proto; do
  ../../.venv/bin/python -m grpc_tools.protoc -I. --python_out=. "$p"
done
