#!/usr/bin/env bash
# Regenerate sdcache/_proto from proto/ (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto/sdcache/v1 --python_out=sdcache/_proto --pyi_out=sdcache/_proto \
    --grpc_python_out=sdcache/_proto proto/sdcache/v1/meta.proto
# grpc_tools emits a top-level import; make it package-relative.
sed -i 's/^import meta_pb2 as/from . import meta_pb2 as/' sdcache/_proto/meta_pb2_grpc.py
