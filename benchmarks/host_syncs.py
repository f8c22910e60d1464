"""Host syncs per optimizer step that the package adds, per registered name usable here (the tests' tiny Llama, one
process, steps 2 to 5, ``max_grad_norm`` 1.0 and 0): the reads of a tensor's value on the host that the package's
code asks for (``tests/host_syncs.py``), and how many of them fall inside backward (a gradient hook). Deterministic:
one run is enough.

    python benchmarks/host_syncs.py            # prints the table (markdown), writes benchmarks/host_syncs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(HERE / "host_syncs.json"))
    args = parser.parse_args()
    from tests.host_syncs import count
    from tests.test_host_syncs import CASES

    rows = {}
    for name, norm in CASES:
        steps = count(name, norm)
        rows[f"{name} max_grad_norm={norm:g}"] = {
            "per_step": max(len(found) for found in steps),
            "in_backward": sum(s.in_backward for found in steps for s in found) / len(steps),
            "where": sorted({s.where for found in steps for s in found}),
        }
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| optim | host syncs per step | of them in backward | where |\n|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row['per_step']} | {row['in_backward']:g} | {', '.join(row['where'])} |")


if __name__ == "__main__":
    main()
