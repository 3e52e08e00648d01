#!/usr/bin/env bash
# Downloads the wheels that a GPU machine without package registries lacks for
# bench/gpu_check.sh into DEST (.whl), for CPython 3.12 on x86-64 Linux; gpu_check.sh installs
# whatever it finds there (`pip install --no-index --no-deps --target`). The list is what this
# workplace's H200 image lacks or has too old (/work/.library/device/KINDS.md): our runtime's
# ZMQ, msgspec, FastAPI, uvicorn, protobuf and grpcio, and the openai client of bench/serve.py.
#
# Not in the list: flashinfer-python. Its 0.7.4 wheel is 101 MB, over the 64 MiB a device call
# carries; the attention step then times the PyTorch backend alone and says FlashInfer is
# missing. A machine with registry access installs it with `pip install -e ".[gpu]"`.
#
#   bench/gpu_wheels.sh            # then carry .whl with the call that runs gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PIP=${PIP:-.venv/bin/pip}
# At this checkout's venv versions (protobuf and grpcio: proto/*_pb2*.py demand at least the
# versions that generated them), with their dependencies resolved for 3.12; a few that the image
# has come along too and shadow its copies.
PACKAGES=()
for name in pyzmq msgspec fastapi uvicorn openai protobuf grpcio; do
  version=$("$PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  PACKAGES+=("$name${version:+==$version}")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
  manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$DEST"
"$PIP" download --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
