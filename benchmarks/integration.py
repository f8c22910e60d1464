"""Integration cost, measured side by side in one run (ratios; medians over interleaved repeats).

1. overhead: time per training step of a module using OptimizerMixin over the same module with the same optimizer
   written by hand in configure_optimizers (goal: at most 1.02x), per family, including LOMO (hand-written: manual
   optimization calling fused_backward) and schedule-free (hand-written: train()/eval() called by the module);
2. vs transformers' Trainer: time per step and final loss on the same model, data, settings and steps;
3. construction: time to build optimizer + scheduler for a model of 1,000 parameter tensors, ours / the Trainer's;
4. memory: peak resident memory growth of a few training steps per family (one process each).

    python benchmarks/integration.py [--quick] [--out benchmarks/integration.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from lightning_optims import OptimizerArguments, OptimizerMixin, create_optimizer, create_scheduler

HERE = Path(__file__).resolve().parent
MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"
FAMILIES = {
    "adamw_torch": dict(optim="adamw_torch"),
    "adafactor": dict(optim="adafactor"),
    "apollo-mini": dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args=MINI),
    "grokadamw": dict(optim="grokadamw"),
    "schedule_free_adamw": dict(optim="schedule_free_adamw", lr_scheduler_type="constant"),
    "lomo": dict(optim="lomo", max_grad_norm=0.0),
}
VOCAB, SEQ, BATCH = 256, 64, 8


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
    )


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def loader(n: int) -> DataLoader:
    return DataLoader(Tokens(n), batch_size=BATCH, shuffle=False, collate_fn=default_data_collator)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t = 0.0

    # CPU time of this process (one thread): the work a step does, not what other tenants of a shared machine took
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.process_time() - self._t)
        if outputs is not None:
            self.losses.append(float(outputs["loss"]))


class WithMixin(OptimizerMixin, L.LightningModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = llama()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


class ByHand(L.LightningModule):
    """What a user writes without the package: the same optimizer and scheduler in configure_optimizers; LOMO by
    manual optimization; schedule-free train()/eval() calls; clipping through Trainer(gradient_clip_val)."""

    def __init__(self, settings: dict, total_steps: int) -> None:
        super().__init__()
        self.model = llama()
        self.args = OptimizerArguments(**settings)
        self.total_steps = total_steps
        self.fused = self.args.optim == "lomo"
        self.automatic_optimization = not self.fused

    def configure_optimizers(self):
        opt = create_optimizer(self.model, self.args, num_training_steps=self.total_steps)
        sched = create_scheduler(opt, self.args, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self):
        opt = self.optimizers().optimizer
        if hasattr(opt, "train"):
            opt.train()

    def on_train_end(self):
        opt = self.optimizers().optimizer
        if hasattr(opt, "eval"):
            opt.eval()

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        if self.fused:  # through LightningOptimizer.step, so that global_step advances
            lopt = self.optimizers()
            lopt.step(closure=lambda: lopt.optimizer.fused_backward(loss, self.lr_schedulers().get_last_lr()[0]))
            self.lr_schedulers().step()
        return loss

    def on_fit_end(self):
        opt = self.optimizers().optimizer
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()


def lightning_fit(module: L.LightningModule, steps: int, clip: float | None) -> StepTimes:
    record = StepTimes()
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=clip,
        callbacks=[record],
    ).fit(module, loader(steps * BATCH))
    return record


def overhead(repeats: int, steps: int) -> dict:
    out = {}
    for family, settings in FAMILIES.items():
        settings = {"learning_rate": 1e-3, **settings}
        mixin_times, hand_times = [], []
        args = OptimizerArguments(**settings)
        clip = args.max_grad_norm if (args.max_grad_norm > 0 and family != "lomo") else None
        byhand_settings = {**settings, "max_grad_norm": 0.0} if clip else settings
        for repeat in range(repeats):  # interleaved A B, B A, A B, ...: neither always runs first
            order = ("mixin", "hand") if repeat % 2 == 0 else ("hand", "mixin")
            for which in order:
                if which == "mixin":
                    mixin_times.append(statistics.median(lightning_fit(WithMixin(**settings), steps, None).times[3:]))
                else:
                    hand = lightning_fit(ByHand(byhand_settings, steps), steps, clip)
                    hand_times.append(statistics.median(hand.times[3:]))
        out[family] = {
            "mixin_s": statistics.median(mixin_times),
            "by_hand_s": statistics.median(hand_times),
            "ratio": statistics.median(mixin_times) / statistics.median(hand_times),
        }
    return out


def noise_floor(repeats: int, steps: int) -> dict:
    """An A/A control: the same hand-written AdamW module against itself, in the same interleaved protocol. Its
    distance from 1.0 is what this machine's noise alone does to one of the ratios above."""
    settings = {"learning_rate": 1e-3, "optim": "adamw_torch", "max_grad_norm": 0.0}
    a, b = [], []
    for _ in range(repeats):
        for times in (a, b):
            times.append(statistics.median(lightning_fit(ByHand(settings, steps), steps, 1.0).times[3:]))
    return {
        "a_s": statistics.median(a),
        "b_s": statistics.median(b),
        "ratio": statistics.median(a) / statistics.median(b),
    }


class _Sequential(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class _HFTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.process_time() - self._t)


def vs_trainer(repeats: int, steps: int) -> dict:
    out = {}
    for family, settings in FAMILIES.items():
        settings = {"learning_rate": 1e-3, **settings}
        ours_t, hf_t, ours_loss, hf_loss = [], [], None, None
        for _ in range(repeats):
            module = WithMixin(**settings)
            rec = lightning_fit(module, steps, None)
            ours_t.append(statistics.median(rec.times[3:]))
            with torch.no_grad():
                batch = next(iter(loader(BATCH)))
                ours_loss = float(module.model(**batch).loss)
            with tempfile.TemporaryDirectory() as tmp:
                ta = TrainingArguments(
                    output_dir=tmp,
                    use_cpu=True,
                    report_to=[],
                    max_steps=steps,
                    per_device_train_batch_size=BATCH,
                    save_strategy="no",
                    logging_steps=10**6,
                    disable_tqdm=True,
                    **settings,
                )
                model = llama()
                hf_rec = _HFTimes()
                trainer = _Sequential(model=model, args=ta, train_dataset=Tokens(steps * BATCH), callbacks=[hf_rec])
                trainer.train()
                hf_t.append(statistics.median(hf_rec.times[3:]))
                with torch.no_grad():
                    hf_loss = float(model(**batch).loss)
        out[family] = {
            "ours_s": statistics.median(ours_t),
            "trainer_s": statistics.median(hf_t),
            "ratio": statistics.median(ours_t) / statistics.median(hf_t),
            "final_loss_ours": ours_loss,
            "final_loss_trainer": hf_loss,
        }
    return out


def construction(repeats: int) -> dict:
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(500))  # 1,000 parameter tensors

    model = Big()
    n = len(list(model.parameters()))
    out = {"parameter_tensors": n}
    for name, settings in (
        ("adamw_torch", dict(optim="adamw_torch")),
        ("apollo_adamw", dict(optim="apollo_adamw", optim_target_modules=["layers"])),
    ):
        ours, theirs = [], []
        with tempfile.TemporaryDirectory() as tmp:
            ta = TrainingArguments(
                output_dir=tmp, use_cpu=True, report_to=[], lr_scheduler_type="cosine", warmup_steps=10, **settings
            )
            trainer = Trainer(model=model, args=ta)
            args = OptimizerArguments.from_training_arguments(ta)
            for _ in range(repeats):
                t = time.perf_counter()
                opt = create_optimizer(model, args)
                create_scheduler(opt, args, 1000)
                ours.append(time.perf_counter() - t)
                trainer.optimizer, trainer.lr_scheduler = None, None
                t = time.perf_counter()
                trainer.create_optimizer_and_scheduler(num_training_steps=1000)
                theirs.append(time.perf_counter() - t)
        out[name] = {
            "ours_s": statistics.median(ours),
            "trainer_s": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
        }
    return out


def memory_child(family: str) -> None:
    import _memory

    module = WithMixin(learning_rate=1e-3, **FAMILIES[family])
    lightning_fit(WithMixin(learning_rate=1e-3, **FAMILIES[family]), 2, None)  # Lightning's one-off set-up costs
    base = _memory.start()
    lightning_fit(module, 4, None)
    print(json.dumps({"growth": _memory.growth_since(base), "parameters": sum(p.numel() for p in module.parameters())}))


def memory() -> dict:
    out = {}
    for family in FAMILIES:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", family], capture_output=True, text=True, check=True
        )
        out[family] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child")
    parser.add_argument("--out", default=str(HERE / "integration.json"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine (the same for both sides of each ratio)
    repeats, steps = (2, 8) if args.quick else (8, 40)
    result = {
        "overhead": overhead(repeats, steps),
        "noise_floor": noise_floor(repeats, steps),
        "vs_trainer": vs_trainer(max(1, repeats // 2), steps),
        "construction": construction(repeats),
        "memory": memory(),
        "settings": {"repeats": repeats, "steps": steps, "batch": BATCH, "seq": SEQ},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
