"""What a sharded step communicates, per optimizer, under FSDP2 at 2 and 4 processes, HSDP at 4 (a replicate x shard
mesh of 2 x 2), tensor parallelism at 2 and tensor parallelism with FSDP2 at 4 (2 x 2): collective calls and bytes per
training step of one process, as ratios to AdamW's in the same launch (the same layout). Deterministic (counted from
tensor sizes by ``tests/collectives.py`` in every fit of ``tests/scripts/sharded_llama_fit.py``: the tiny Llama of
the tests, every decoder layer and the model ``fully_shard``-ed, 3 FSDP parameter groups; under tensor parallelism
each decoder layer parallelised), so one run is enough.

    python benchmarks/collectives.py            # prints the table, writes benchmarks/collectives.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = ROOT / "tests" / "scripts" / "sharded_llama_fit.py"
RUNS = [  # label, optim, max_grad_norm
    ("adamw_torch", "adamw_torch", "1.0"),
    ("schedule_free_adamw", "schedule_free_adamw", "1.0"),
    ("lomo", "lomo", "0"),
    ("lomo+clip", "lomo", "1.0"),
    ("adalomo", "adalomo", "0"),
    ("adalomo+clip", "adalomo", "1.0"),
    ("apollo-mini", "apollo_mini", "1.0"),
    ("apollo (channel)", "apollo_adamw", "1.0"),
    ("apollo proj=svd", "apollo_svd", "1.0"),
    ("galore_adamw", "galore_adamw", "1.0"),
    ("galore_adafactor", "galore_adafactor", "1.0"),
    ("galore_adafactor reverse_std", "galore_adafactor+proj_type=reverse_std", "1.0"),
    ("adafactor", "adafactor", "1.0"),
    ("grokadamw", "grokadamw", "1.0"),
    ("stable_adamw", "stable_adamw", "1.0"),
    ("apollo_adamw_layerwise", "apollo_adamw_layerwise", "0"),
    ("galore_adamw_layerwise", "galore_adamw_layerwise", "0"),
    ("galore_adafactor_layerwise", "galore_adafactor_layerwise", "0"),
]
# a projection renewed from the SVD of the whole gradient every 2 steps (steps 0 and 2): its blocks sent to one
# process, the one step the bound excepts; the table gives the most of any step and, after it, of the steps that do
# not renew
RENEWING = {"apollo proj=svd", "galore_adamw", "galore_adafactor", "galore_adafactor reverse_std"}
RENEWING |= {"galore_adamw_layerwise", "galore_adafactor_layerwise"}
FSDP_GROUPS = 3


LAYOUTS = [  # label, layout, processes
    ("FSDP2", "fsdp2", 2),
    ("FSDP2", "fsdp2", 4),
    ("HSDP 2x2", "hsdp", 4),
    ("TP", "tp", 2),
    ("TP+FSDP2 2x2", "2d", 4),
]
# what runs under tensor parallelism (the rest is refused when fit starts: docs/strategies.md); schedule-free only
# where every parameter is a DTensor (2-D)
ON_TENSOR_PARALLEL = {
    "tp": {"adamw_torch", "adafactor", "grokadamw", "stable_adamw", "lomo", "adalomo", "apollo_mini", "apollo_adamw"}
}
ON_TENSOR_PARALLEL["tp"] |= {"apollo_svd", "galore_adamw", "galore_adafactor", "galore_adafactor+proj_type=reverse_std"}
# 2-D: schedule-free (every parameter a DTensor) and the layer-wise names (their steps batched per FSDP2 group)
ON_TENSOR_PARALLEL["2d"] = ON_TENSOR_PARALLEL["tp"] | {"schedule_free_adamw"}
ON_TENSOR_PARALLEL["2d"] |= {"apollo_adamw_layerwise", "galore_adamw_layerwise", "galore_adafactor_layerwise"}


def launch(layout: str, processes: int, out: Path) -> dict[str, list[dict]]:
    chosen = [run for run in RUNS if layout not in ON_TENSOR_PARALLEL or run[1] in ON_TENSOR_PARALLEL[layout]]
    names = [f"run{i}" for i in range(len(chosen))]
    runs = [f"{name}:{optim}:{norm}" for name, (_, optim, norm) in zip(names, chosen)]
    env = {**os.environ, "SHARDED_TEST_PROCESSES": str(processes), "SHARDED_TEST_LAYOUT": layout}
    subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "sharded", *runs], cwd=ROOT, env=env, check=True, capture_output=True
    )
    return {label: json.loads((out / f"{name}.collectives").read_text()) for name, (label, *_) in zip(names, chosen)}


def per_step(steps: list[dict], what: str, regular: bool = False) -> int:
    """The most of any step (a projection renewal step communicates more than the others), or of the steps that do
    not renew (``regular``: steps 1 and 3)."""
    return max(sum(step[what].values()) for index, step in enumerate(steps) if not regular or index % 2 == 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=HERE / "collectives.json")
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict]]] = {}
    for label, layout, processes in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            results[f"{label}, {processes}"] = launch(layout, processes, Path(tmp))
    print(
        f"bound: calls at most AdamW's + {2 * FSDP_GROUPS} (2 per FSDP group; tensor parallel alone: + 4, 2 per "
        "parallelised module), bytes at most 1.05x AdamW's; refused: not run on that layout (refused when fit "
        "starts)\n"
    )
    header = " | ".join(f"calls, {key} | bytes / AdamW's, {key}" for key in results)
    print(f"| optimizer | {header} |")
    print("|---|" + "---|" * (2 * len(results)))
    for label, *_ in RUNS:
        cells = []
        for result in results.values():
            if label not in result:
                cells += ["refused", ""]
                continue
            ours, adamw = result[label], result["adamw_torch"]
            calls, reference = per_step(ours, "calls"), per_step(adamw, "calls")
            ratio = f"{per_step(ours, 'bytes') / per_step(adamw, 'bytes'):.2f}x"
            if label in RENEWING:
                regular = per_step(ours, "bytes", True) / per_step(adamw, "bytes", True)
                cells += [f"{calls} (AdamW {reference}; {per_step(ours, 'calls', True)} regular)"]
                cells += [f"{ratio} ({regular:.2f}x regular)"]
            else:
                cells += [f"{calls} (AdamW {reference})", ratio]
        print(f"| {label} | " + " | ".join(cells) + " |")
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
