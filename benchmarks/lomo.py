"""LOMO benchmark: step time and memory of the fused-backward engine, measured side by side in one run.

(a) time per training step on a 64-layer tiny Llama (579 parameter tensors), as ratios:
    our LOMO / our AdamW, our LOMO / lomo_optim's LOMO (the upstream O(P^2) hook), and AdaLomo likewise.
    The variants are interleaved (one step of each in turn) and the median over the repeats is reported.
(b) peak memory growth of a training step over the weights alone, LOMO vs AdamW, on a Llama of >= 50M parameters,
    each measured in a fresh process (peak resident memory above the weights: VmHWM reset before the steps).

    python benchmarks/lomo.py            # prints both tables, writes benchmarks/lomo.json
    python benchmarks/lomo.py --quick    # fewer repeats, smaller memory model (for tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import LlamaConfig, LlamaForCausalLM

from lightning_optims import OptimizerArguments, create_optimizer

HERE = Path(__file__).resolve().parent


def llama(layers: int, hidden: int, vocab: int, intermediate: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class Variant:
    """One way of doing a training step, on its own copy of the model."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        self.name, self.model = name, model
        self.clip = None
        if name.startswith("lomo_optim"):
            import lomo_optim

            cls = lomo_optim.AdaLomo if "adalomo" in name else lomo_optim.Lomo
            self.opt = cls(model, lr=1e-4)
            self.kind = "upstream"
        else:
            optim, clip, _ = name.partition("+clip")  # clip: "+clip" or ""
            args = OptimizerArguments(optim=optim, learning_rate=1e-4, max_grad_norm=1.0 if clip else 0.0)
            self.opt = create_optimizer(model, args)
            self.kind = "fused" if hasattr(self.opt, "fused_backward") else "torch"
            self.clip = 1.0 if (clip and self.kind == "torch") else None

    def step(self, batch: torch.Tensor) -> None:
        loss = self.model(input_ids=batch, labels=batch).loss
        if self.kind == "torch":
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        elif self.kind == "fused":
            self.opt.fused_backward(loss)
        else:
            self.opt.fused_backward(loss, 1e-4)


def step_times(repeats: int, steps_per_repeat: int) -> dict:
    base = llama(layers=64, hidden=32, vocab=128, intermediate=64)
    n_tensors = len(list(base.parameters()))
    names = [
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_torch_fused+clip",
        "lomo",
        "lomo+clip",
        "lomo_optim.Lomo",
        "adalomo",
        "lomo_optim.AdaLomo",
    ]
    variants = []
    for name in names:
        model = llama(layers=64, hidden=32, vocab=128, intermediate=64)
        if "AdaLomo" in name:  # lomo_optim.AdaLomo calls .cuda() in __init__: neutralise it on a CPU machine
            original = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *a, **k: self
            try:
                variants.append(Variant(name, model))
            finally:
                torch.Tensor.cuda = original
        else:
            variants.append(Variant(name, model))
    batch = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    for v in variants:  # warm-up (AdamW state allocation, first-call overheads)
        for _ in range(2):
            v.step(batch)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:  # interleaved: every variant sees the same machine state within a repeat
            start = time.perf_counter()
            for _ in range(steps_per_repeat):
                v.step(batch)
            samples[v.name].append((time.perf_counter() - start) / steps_per_repeat)
    median = {k: statistics.median(x) for k, x in samples.items()}
    ratios = {
        "lomo / adamw_torch_fused": median["lomo"] / median["adamw_torch_fused"],
        "lomo / adamw_torch": median["lomo"] / median["adamw_torch"],
        "lomo+clip / adamw_torch_fused+clip": median["lomo+clip"] / median["adamw_torch_fused+clip"],
        "lomo / lomo_optim.Lomo": median["lomo"] / median["lomo_optim.Lomo"],
        "adalomo / adamw_torch_fused": median["adalomo"] / median["adamw_torch_fused"],
        "adalomo / lomo_optim.AdaLomo": median["adalomo"] / median["lomo_optim.AdaLomo"],
    }
    return {
        "parameter_tensors": n_tensors,
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
        "median_seconds": median,
        "ratios": ratios,
    }


def memory_child(name: str, quick: bool) -> None:
    """In a fresh process: weights, then two training steps; print the peak growth over the weights."""
    shape = (
        dict(layers=4, hidden=384, vocab=32000, intermediate=1024)
        if quick
        else dict(layers=8, hidden=512, vocab=32000, intermediate=1536)
    )
    model = llama(**shape)
    params = sum(p.numel() for p in model.parameters())
    batch = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    variant = Variant(name, model)
    import _memory

    base = _memory.start()  # weights (and nothing else of training) are resident here
    for _ in range(2):
        variant.step(batch)
    print(json.dumps({"name": name, "parameters": params, "weights_rss": base, "growth": _memory.growth_since(base)}))


def memory(quick: bool) -> dict:
    out = {}
    for name in ("adamw_torch", "lomo", "adalomo"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name] + (["--quick"] if quick else []),
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "parameters": out["adamw_torch"]["parameters"],
        "growth_bytes": {k: v["growth"] for k, v in out.items()},
        "ratios": {
            "lomo / adamw_torch": out["lomo"]["growth"] / out["adamw_torch"]["growth"],
            "adalomo / adamw_torch": out["adalomo"]["growth"] / out["adamw_torch"]["growth"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child")
    parser.add_argument("--out", default=str(HERE / "lomo.json"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.quick)
        return
    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine
    times = step_times(repeats=3 if args.quick else 15, steps_per_repeat=2 if args.quick else 5)
    mem = memory(args.quick)
    result = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "step_time": times, "memory": mem}
    print(f"(a) step time, {times['parameter_tensors']} parameter tensors, median of {times['repeats']} repeats")
    for k, v in times["median_seconds"].items():
        print(f"    {k:28s} {v * 1e3:8.1f} ms")
    for k, v in times["ratios"].items():
        print(f"    {k:38s} {v:6.2f}x")
    print(f"(b) peak memory growth of a step over the weights, {mem['parameters'] / 1e6:.1f}M parameters")
    for k, v in mem["growth_bytes"].items():
        print(f"    {k:28s} {v / 2**20:8.1f} MiB")
    for k, v in mem["ratios"].items():
        print(f"    {k:38s} {v:6.2f}x")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
