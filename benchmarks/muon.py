"""Muon benchmark (optim="muon"), three figures, each measured side by side in one run:

- one device: the median wall time of a training step (forward, backward, step) with Muon / with AdamW, on the
  example model of ``examples/lm.py`` and on a wider one (``SIZES["wide"]``), alternating the two optimizers, 7 pairs;
- sharded (FSDP2 on the CPU, gloo): the optimizer's CPU time per process and step at 4 processes / at 2
  (``benchmarks/sharded.py``'s clock and method), on a Llama whose hidden matrices are wide (``SIZES["wide"]``:
  the Newton-Schulz iterations dominate the step), beside FSDP2 AdamW's own ratio. Goal: at most 0.65 (the
  iterations are dealt among the processes, each matrix orthogonalized by one owner);
- loss against steps on the bundled corpus (``examples/data/corpus.txt``, the main job's model and data), Muon beside
  AdamW at the same learning rate and schedule (``adjust_lr_fn=match_rms_adamw``), drawn to ``benchmarks/muon.png``.

    python benchmarks/muon.py                   # prints the figures, writes benchmarks/muon.json and muon.png
    python benchmarks/muon.py --quick --out X   # fewer steps and repeats (numbers not meaningful); X.json, X.png
(run by benchmarks/run_all.py: section 8 of benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import sharded  # noqa: E402

MUON = dict(
    optim="muon", max_grad_norm=1.0, optim_target_modules="all-linear", optim_args="adjust_lr_fn=match_rms_adamw"
)
ADAMW = dict(optim="adamw_torch", max_grad_norm=1.0)
sharded.CONFIGS["muon"] = MUON  # (the sharded runs: benchmarks/sharded.py's worker, re-run by this script)
# the hidden matrices 512 x 1536: the Newton-Schulz iterations (m * n * min(m, n) each, 5 times) dominate the step
sharded.SIZES["wide"] = dict(layers=2, hidden=512, intermediate=1536, vocab=512, seq=16, batch=1, steps=8)


def one_device_step_times(size: dict, pairs: int) -> dict[str, float]:
    """Median wall time of a training step (forward, backward, clipping, step) for Muon and AdamW on one device, the
    two alternating; one thread (as each process of the sharded runs)."""
    import torch

    from lightning_optims import OptimizerArguments, create_optimizer

    torch.set_num_threads(1)
    batch = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"muon": [], "adamw_torch": []}
    setups = {}
    for label, settings in (("muon", MUON), ("adamw_torch", ADAMW)):
        model = sharded._llama(size)
        settings = {k: v for k, v in settings.items() if k != "max_grad_norm"}
        setups[label] = (model, create_optimizer(model, OptimizerArguments(learning_rate=1e-3, **settings)))
    for _ in range(pairs):
        for label, (model, optimizer) in setups.items():
            start = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t[1:]) for label, t in times.items()}


def loss_curves(steps: int) -> dict[str, list[float]]:
    """The main job's fit (examples/lm.py: its model, the bundled corpus) with Muon and with AdamW, the training loss
    at every step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lm import CausalLM, TextDataModule

    from tests.helpers import lightning_trainer

    curves: dict[str, list[float]] = {}

    class Losses(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    for label, settings in (("muon", MUON), ("adamw_torch", ADAMW)):
        L.seed_everything(0, verbose=False)
        record = Losses()
        module = CausalLM(learning_rate=3e-3, warmup_steps=10, **settings)
        trainer = lightning_trainer(steps, callbacks=[record])  # (one CPU device, no logger, no validation)
        trainer.fit(module, TextDataModule(path=str(ROOT / "examples" / "data" / "corpus.txt")))
        curves[label] = record.losses
    return curves


def draw(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, losses in curves.items():
        axes.plot(range(1, len(losses) + 1), losses, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("examples/lm.py on the bundled corpus (benchmarks/muon.py)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "muon.json"))
    args = parser.parse_args()
    repeats, pairs, steps = (1, 3, 20) if args.quick else (3, 7, 300)
    result: dict = {"one_device_step": {}, "sharded": {}}
    for name, size in (("example", dict(layers=2, hidden=64, intermediate=172, vocab=256, seq=64, batch=8)),
                       ("wide", sharded.SIZES["wide"])):  # fmt: skip
        times = one_device_step_times(size, pairs)
        result["one_device_step"][name] = {**times, "ratio": times["muon"] / times["adamw_torch"]}
        print(f"one device, {name} model: step time muon / adamw = {times['muon'] / times['adamw_torch']:.2f}x")
    cpu: dict[str, dict[int, list[float]]] = {"muon": {2: [], 4: []}, "adamw_torch": {2: [], 4: []}}
    for _ in range(repeats):  # (alternating, as benchmarks/sharded.py)
        for label in cpu:
            for processes in (2, 4):
                cpu[label][processes].append(sharded.run_config(label, "wide", processes, __file__)["optimizer_cpu_s"])
    for label, by in cpu.items():
        ratio = statistics.median(by[4]) / statistics.median(by[2])
        result["sharded"][label] = {"cpu_s_2": statistics.median(by[2]), "cpu_s_4": statistics.median(by[4]),
                                    "ratio_4_to_2": ratio}  # fmt: skip
        print(f"FSDP2, wide model: optimizer CPU time per process, 4 processes / 2, {label}: {ratio:.2f}")
    curves = loss_curves(steps)
    result["loss"] = {label: {"first": c[0], "last_10_mean": statistics.mean(c[-10:])} for label, c in curves.items()}
    result["curves"] = curves
    for label, c in curves.items():
        print(f"loss on the corpus, {label}: {c[0]:.3f} at step 1, {statistics.mean(c[-10:]):.3f} over the last 10")
    Path(args.out).write_text(json.dumps(result, indent=1))
    draw(curves, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sharded.worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
