"""Train the example model with several optimizers; write a PNG of the loss curves and a markdown table.

    python examples/compare.py                 # 300 steps each; writes docs/compare.png and docs/compare.md
    python examples/compare.py --steps 20      # a quick look

Each optimizer runs in its own process (so its peak memory is its own), on the same model initialisation, data and
batch order. The table gives the final training loss (mean of the last 10 steps), the validation loss at the end,
the median time per step, and the peak resident memory above the memory held before training started.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
RUNS = {
    "AdamW": dict(optim="adamw_torch_fused", learning_rate=1e-3),
    "APOLLO-Mini": dict(
        optim="apollo_adamw", learning_rate=1e-3, optim_target_modules=[".*.attn.*", ".*.mlp.*"], optim_args=MINI
    ),
    "GrokAdamW": dict(optim="grokadamw", learning_rate=1e-3),
    "AdaLomo": dict(optim="adalomo", learning_rate=1e-2, max_grad_norm=0.0),
    "Schedule-free AdamW": dict(optim="schedule_free_adamw", learning_rate=2.5e-3, warmup_steps=20),
}


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (Linux); return the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_one(name: str, steps: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lm import CausalLM, TextDataModule

    class Record(Callback):
        def __init__(self):
            self.losses, self.times, self._t = [], [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)
            self.losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    model = CausalLM(hidden_size=64, num_layers=2, lr_scheduler_type="constant", **RUNS[name])
    data = TextDataModule(batch_size=8, seq_len=64)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        val_check_interval=min(100, steps),
        limit_val_batches=20,
        num_sanity_val_steps=0,
    )
    base = _reset_peak()
    trainer.fit(model, data)
    peak = _status_kib("VmHWM") * 1024
    return {
        "name": name,
        "losses": record.losses,
        "step_time": statistics.median(record.times[5:] or record.times),
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "peak_growth": max(0, peak - base),
        "settings": RUNS[name],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--one")
    parser.add_argument("--out", default=str(HERE.parent / "docs"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    results = []
    for name in RUNS:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: final loss {statistics.mean(results[-1]['losses'][-10:]):.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        losses = r["losses"]
        window = 10
        smooth = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of the last 10 steps)")
    ax.set_title(f"examples/lm.py, bundled corpus, batch 8 x 64 bytes, {args.steps} steps, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)

    lines = [
        "| optimizer | settings | final train loss | val loss | time / step | peak memory growth |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "optim_target_modules")
        lines.append(
            f"| {r['name']} | `{settings}` | {statistics.mean(r['losses'][-10:]):.3f} | {r['val_loss']:.3f} "
            f"| {r['step_time'] * 1e3:.1f} ms | {r['peak_growth'] / 2**20:.0f} MiB |"
        )
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(
        f"Produced by `python examples/compare.py --steps {args.steps}` (one process per optimizer, CPU).\n\n" + table
    )
    print(table)
    print(f"written: {out / 'compare.png'}, {out / 'compare.md'}")


if __name__ == "__main__":
    main()
