"""Generate the gRPC/protobuf stubs for specbridge.v1 from proto/ (never hand-edited, never committed).

Run by `make install` and by the package build; output lands in specbridge/v1/.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def generate(out_root: Path = REPO_ROOT) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(sources))
    for package_dir in {(out_root / s).parent for s in sources}:
        (package_dir / "__init__.py").touch()


def generated_packages() -> list[str]:
    """Dotted names of the packages the stubs land in (one per proto directory)."""
    return sorted({".".join(p.parent.relative_to(PROTO_ROOT).parts) for p in PROTO_ROOT.rglob("*.proto")})


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
