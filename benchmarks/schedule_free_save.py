"""Memory of saving a checkpoint in train mode with a schedule-free optimizer, side by side in one run:

- ``out of place`` (one device / DDP with schedulefree's optimizers): the averaged point ``lerp(y, z, w)`` is
  computed into the checkpoint, the live weights do not move;
- ``copying`` (the path for any other schedule-free optimizer or strategy, and this package's only path before):
  copy the train point, ``eval()`` in place, copy the module state, put the train point back.

Two figures per path: the bytes that aten operations allocate during ``trainer.save_checkpoint`` (counted exactly
with a dispatch mode, views excluded), and the peak resident growth of the process during the save (VmHWM, page
granular). Both are given in units of the averaged parameters' bytes (the weights that have a second sequence).

    python benchmarks/schedule_free_save.py                      # the bundled model (examples/configs)
    python benchmarks/schedule_free_save.py --hidden-size 512 --layers 4   # a larger one, for the resident figure
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _memory  # noqa: E402
from lm import CausalLM, TextDataModule  # noqa: E402

from lightning_optims.callbacks import schedule_free  # noqa: E402
from tests.collectives import AllocatedBytes  # noqa: E402


def measure(hidden_size: int, layers: int, copying: bool) -> dict:
    torch.manual_seed(0)
    module = CausalLM(
        hidden_size=hidden_size,
        num_layers=layers,
        intermediate_size=2 * hidden_size,
        optim="schedule_free_adamw",
        lr_scheduler_type="constant",
        learning_rate=1e-3,
        max_grad_norm=0.0,
    )
    measured: dict = {}

    class SaveInTrainMode(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != 3:
                return
            optimizer = trainer.optimizers[0]
            assert schedule_free.in_train_mode(optimizer)  # (mid-training: the optimizer is in train mode)
            params = schedule_free._averaged_params(optimizer)
            averaged = sum(p.numel() * p.element_size() for p in params)
            before = [p.detach().clone() for p in params]
            patch = mock.patch.object(schedule_free, "_eval_point_into", return_value=False)
            with tempfile.TemporaryDirectory() as tmp, patch if copying else contextlib.nullcontext():
                counter = AllocatedBytes()
                base = _memory.start()
                with counter:
                    trainer.save_checkpoint(Path(tmp) / "train_mode.ckpt")
                resident = _memory.growth_since(base)
            assert all(torch.equal(p, q) for p, q in zip(params, before))  # the run's weights did not move
            measured.update(averaged_bytes=averaged, allocated=counter.bytes / averaged, resident=resident / averaged)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[SaveInTrainMode()],
    )
    trainer.fit(module, datamodule=TextDataModule(batch_size=2, seq_len=32))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", choices=["copying", "out of place"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one measurement in a fresh process (the resident peak must not see another run's freed memory)
        print(json.dumps(measure(args.hidden_size, args.layers, args.one == "copying")))
        return
    runs: dict[str, list[dict]] = {"copying": [], "out of place": []}
    for _ in range(args.repeats):  # interleaved
        for path in runs:
            cmd = [sys.executable, __file__, "--one", path, "--hidden-size", str(args.hidden_size)]
            out = subprocess.run([*cmd, "--layers", str(args.layers)], capture_output=True, text=True, check=True)
            runs[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = runs["copying"][0]["averaged_bytes"] / 2**20
    print(f"model: hidden_size={args.hidden_size}, layers={args.layers}; averaged parameters: {mib:.2f} MiB")
    print("| save path | allocated during save / averaged params | peak resident growth / averaged params (median) |")
    print("|---|---|---|")
    for path, rs in runs.items():
        resident = statistics.median(r["resident"] for r in rs)
        print(f"| {path} | {rs[0]['allocated']:.2f}x | {resident:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
