"""Compile protos/mixshow.proto into protos/mixshow_pb2.py and protos/mixshow_pb2_grpc.py (grpcio-tools)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path = HERE) -> None:
    """Run protoc from grpcio-tools; imports in the generated gRPC module point at the protos package."""
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                        str(HERE / "mixshow.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    grpc_module = out_dir / "mixshow_pb2_grpc.py"
    text = grpc_module.read_text().replace("import mixshow_pb2 as", "from protos import mixshow_pb2 as")
    grpc_module.write_text(text)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
