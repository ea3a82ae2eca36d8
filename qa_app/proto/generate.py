"""Generate the Python gRPC code from protos/npc_qa.proto: ``python -m qa_app.proto.generate``.

The generated files are committed (users need no protoc); tests fail when they are stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "npc_qa.proto"


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Write qa_app/proto/npc_qa_pb2.py, .pyi and npc_qa_pb2_grpc.py under out_dir."""
    from grpc_tools import protoc

    # Map protos/ to the package path so the generated imports read "from qa_app.proto import npc_qa_pb2".
    args = ["protoc", f"-Iqa_app/proto={PROTO.parent}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", "qa_app/proto/npc_qa.proto"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    folder = out_dir / "qa_app" / "proto"
    return sorted(folder.glob("npc_qa_pb2*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
