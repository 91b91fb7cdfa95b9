#!/usr/bin/env bash
# Regenerates gateway/pb/ from proto/*.proto with grpcio-tools (a test checks it is current).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gateway/pb}
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/control.proto proto/gateway.proto
# grpc_tools writes absolute imports; make them package-relative.
sed -i 's/^import control_pb2 as/from . import control_pb2 as/; s/^import gateway_pb2 as/from . import gateway_pb2 as/' "$out"/*_grpc.py
[ -f "$out/__init__.py" ] || echo '"""Generated protobuf and gRPC stubs (proto/generate.sh); do not edit."""' > "$out/__init__.py"
