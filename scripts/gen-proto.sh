#!/usr/bin/env bash
# Regenerate hpcckpt/images/hpcckpt_pb2.py from the format's .proto (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/../hpcckpt/images"
../../.venv/bin/python -m grpc_tools.protoc -I. --python_out=. hpcckpt.proto
