"""Regenerate the protobuf and gRPC modules from the `.proto` files in `PROTO_FILES`.

The generated modules are committed; `tests/test_proto.py` fails when they are stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ["kimiserve.proto", "control.proto", "vision.proto"]


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` into `out_dir`; returns their paths."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_DIR / name) for name in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for name in PROTO_FILES:
        stem = name.removesuffix(".proto")
        written += [out_dir / f"{stem}_pb2{ext}" for ext in (".py", ".pyi", "_grpc.py")]
    stems = "|".join(name.removesuffix(".proto") for name in PROTO_FILES)
    for module in written:
        # protoc emits top-level imports of its own modules (the gRPC module's, and those of
        # imported .proto files); the modules live inside the `proto` package.
        text = re.sub(rf"^import ({stems})_pb2", r"from proto import \1_pb2", module.read_text(),
                      flags=re.M)  # fmt: skip
        module.write_text(text)
    return written


if __name__ == "__main__":
    for path in generate():
        sys.stdout.write(f"wrote {path}\n")
