"""Generate the Python stubs for ddm/v1/ddm.proto (run after editing the .proto; commit the output).

    python proto/generate.py            # rewrite proto/ddm/v1/ddm_pb2{,_grpc}.py{,i} in place
    python proto/generate.py --out DIR  # write them under DIR instead (the drift test compares)

protoc names the generated modules after the .proto's path (``ddm/v1/ddm.proto`` -> module
``ddm.v1.ddm_pb2``) and writes that as an absolute import into the gRPC stub. Inside the installed
package the stubs live at ``ddm.proto.ddm.v1``, so the imports are rewritten here, once, rather than
patched at runtime with ``sys.path`` tricks. The descriptor keeps the file name ``ddm/v1/ddm.proto``,
which is what reflection clients (grpcurl) and other languages expect for package ``ddm.v1``.

Versions are pinned in requirements/constraints.txt (grpcio-tools bundles protoc), so regenerating
gives byte-identical files; tests/test_grpc_proto.py checks that the committed stubs never drift.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # the folder that holds ddm/v1/ddm.proto
PROTO_FILE = "ddm/v1/ddm.proto"
PACKAGE_DIR = "ddm/v1"
# The Python package the proto root is installed as (pyproject: "ddm.proto" = "proto").
PYTHON_PREFIX = "ddm.proto"
GENERATED = ("ddm_pb2.py", "ddm_pb2.pyi", "ddm_pb2_grpc.py")


def _fix_imports(text: str) -> str:
    """``from ddm.v1 import ddm_pb2`` -> ``from ddm.proto.ddm.v1 import ddm_pb2`` (and plain imports)."""
    text = re.sub(r"^from ddm\.v1 import ", f"from {PYTHON_PREFIX}.ddm.v1 import ", text, flags=re.MULTILINE)
    return re.sub(r"^import ddm\.v1\.", f"import {PYTHON_PREFIX}.ddm.v1.", text, flags=re.MULTILINE)


def generate(out: Path) -> list[Path]:
    """Run protoc for ddm.proto and write the fixed stubs into ``out/ddm/v1``. Returns the files."""
    from grpc_tools import protoc  # grpcio-tools: a build-time dependency only

    with tempfile.TemporaryDirectory() as tmp:
        well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO_ROOT / PROTO_FILE}")
        dest = out / PACKAGE_DIR
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / PACKAGE_DIR / name).read_text()
            path = dest / name
            path.write_text(_fix_imports(text))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="root to write ddm/v1/* under (default: proto/)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
