"""Regenerate the committed Python stubs from proto/tandem/v1/*.proto.

    python -m tools.gen_protos          # rewrite the stubs in place
    python -m tools.gen_protos --check  # exit 1 if the committed stubs are stale

The stubs (``*_pb2.py``, ``*_pb2_grpc.py``, ``*_pb2.pyi``) are generated code: never edit
them by hand. grpcio-tools is pinned in the test extra so the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "tandem" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs for every .proto under ``out_root`` (mirroring the repo layout)."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--grpc_python_out={out_root}",
            f"--pyi_out={out_root}", *[str(p.relative_to(ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    rel = PROTO_DIR.relative_to(ROOT)
    return sorted(p for p in (out_root / rel).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_stubs() -> list[str]:
    """Names of generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [f.name for f in fresh if not (PROTO_DIR / f.name).is_file()
                or not filecmp.cmp(f, PROTO_DIR / f.name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python -m tools.gen_protos", file=sys.stderr)
            return 1
        return 0
    for f in generate(ROOT):
        print(f"wrote {f.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
