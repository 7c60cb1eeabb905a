"""Generate Python modules for protos/synpref/v1/*.proto into gen/synpref/v1.

The output path mirrors the proto package, so generated imports
(`from synpref.v1 import pair_pb2`) resolve without rewriting.
"""

import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "gen"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "synpref" / "v1").glob("*.proto"))
    pkg_dir = OUT / "synpref" / "v1"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    (pkg_dir / "__init__.py").write_text('"""Generated from protos/synpref/v1 by protos/generate.py. Do not edit."""\n')
    # PEP 561 marker: type checkers read the generated .pyi stubs of the installed package.
    (pkg_dir / "py.typed").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
