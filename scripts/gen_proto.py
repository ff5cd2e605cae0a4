"""Regenerate the Python modules of the syscall ABI from proto/kernos/v1/*.proto.

    python scripts/gen_proto.py          # write proto/v1/*_pb2*.py
    python scripts/gen_proto.py --check  # exit 1 if the committed modules are stale

protoc names modules after the .proto path (`kernos.v1`); they live at `kernos.proto.v1`, so the
cross-file imports are rewritten to relative ones.
"""

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto"
DEST = ROOT / "proto" / "v1"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(SRC)) for p in (SRC / "kernos" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{SRC}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for f in sorted((Path(tmp) / "kernos" / "v1").iterdir()):
            text = re.sub(r"^from kernos\.v1 import", "from . import", f.read_text(), flags=re.M)
            (out / f.name).write_text(text)
            written.append(out / f.name)
        return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed modules instead of writing")
    args = ap.parse_args()
    if not args.check:
        for old in DEST.glob("*_pb2*.py*"):
            old.unlink()
        for f in generate(DEST):
            print("wrote", f.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p.name for p in DEST.glob("*_pb2*.py*"))
        stale = [
            f.name for f in fresh if not (DEST / f.name).exists() or not filecmp.cmp(f, DEST / f.name, shallow=False)
        ]
        extra = sorted(set(committed) - {f.name for f in fresh})
        if stale or extra:
            print("generated modules are stale:", ", ".join(stale + extra), "- run: python scripts/gen_proto.py")
            return 1
    print("generated modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
