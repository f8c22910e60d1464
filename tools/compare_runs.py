"""Compare the launched fits of two runs of tests/test_sharded.py (a refactoring must leave them bit-identical).

    git worktree add /tmp/base BASE_COMMIT
    (cd /tmp/base && PYTHONPATH=/tmp/base python -m pytest tests/test_sharded.py --basetemp=/tmp/before)
    python -m pytest tests/test_sharded.py --basetemp=/tmp/after
    python tools/compare_runs.py /tmp/before /tmp/after

Every ``NAME.digests`` (each process's full weights), ``.collectives`` (calls and bytes per step), ``.norms``
(``grad_norm`` per step), ``.steps`` and ``.failed.rankR`` file of each launch folder (FSDP2, HSDP, tensor parallel,
2-D, DDP) is compared byte for byte; the exit status is 1 if one differs or is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

KINDS = ("*.digests", "*.collectives", "*.norms", "*.steps", "*.failed.rank*")


def main(before: Path, after: Path) -> int:
    bad = 0
    for folder in sorted(p for p in before.iterdir() if p.is_dir() and not p.name.startswith("test_")):
        if folder.name.endswith("current"):
            continue
        files = sorted(f for kind in KINDS for f in folder.glob(kind))
        differ = [
            f.name
            for f in files
            if not (after / folder.name / f.name).exists()
            or (after / folder.name / f.name).read_bytes() != f.read_bytes()
        ]
        print(f"{folder.name}: {len(files) - len(differ)} of {len(files)} files identical")
        for name in differ:
            print(f"  differs or missing: {name}")
        bad += len(differ)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
