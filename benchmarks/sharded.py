"""Sharded training benchmark: the optimizers that run under ModelParallelStrategy (FSDP2), 2 and 4 CPU processes.

For each optimizer, a Lightning fit of a Llama (every decoder layer and the model ``fully_shard``-ed) as a user runs
it, measured in each process:

- collective calls and bytes per training step (the most of any step; counted from tensor sizes by
  ``tests/collectives.py``) / FSDP2 AdamW's, at 2 and 4 processes;
- the optimizer's CPU time per process and step (``OptimizerClock``: its main thread's CPU time in ``step`` without
  the closure, plus its work inside backward for the in-backward and layer-wise engines), at 4 processes / at 2,
  beside FSDP2 AdamW's own ratio (goal: within 0.15 of it, i.e. the optimizer's work divides as AdamW's does); with 2
  cores the 4-process run shares them, so only CPU time, not wall time, is compared there, and each process's figure
  is the least of its steps (after 2), the processes' median, the repeats' median: the sharing only adds time;

- per-process optimizer state (bytes of this process's part of every state tensor) / the state the same optimizer
  holds on one device for the same model (goal <= 0.5 plus the largest tensor's share);
- step time (median wall time of a training step, from ``on_train_batch_start`` to ``on_train_batch_end``) / FSDP2
  AdamW's step time in the same run (goal <= 1.5x for APOLLO-Mini and LOMO);
- peak memory growth of the steps (VmHWM above what was resident when training started) / FSDP2 AdamW's (goal
  <= 0.35x for LOMO), on a deeper Llama with a small batch (``SIZES["memory"]``: 24 layers), where weights,
  gradients and optimizer state dominate as they do at scale (FSDP2's own working memory is one or two layers
  whatever the depth), one fresh pair of processes per optimizer, with glibc's mmap threshold fixed (``FIXED_MALLOC``:
  otherwise the high-water mark also counts freed blocks glibc keeps in its heap).

The configurations run one after another, three times, in alternating order; the medians are reported.

    python benchmarks/sharded.py                  # prints the table, writes benchmarks/sharded.json
    python benchmarks/sharded.py --quick --out X  # a smaller model and fewer steps (numbers not meaningful)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
CONFIGS = {  # label: settings
    "adamw_torch": dict(optim="adamw_torch", max_grad_norm=1.0),
    "schedule_free_adamw": dict(optim="schedule_free_adamw", max_grad_norm=1.0, lr_scheduler_type="constant"),
    "lomo": dict(optim="lomo", max_grad_norm=0.0),
    "lomo+clip": dict(optim="lomo", max_grad_norm=1.0),
    "adalomo": dict(optim="adalomo", max_grad_norm=0.0),
    "apollo-mini": dict(
        optim="apollo_adamw",
        max_grad_norm=1.0,
        optim_target_modules="all-linear",
        optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
    ),
    "apollo-mini-layerwise": dict(
        optim="apollo_adamw_layerwise",
        max_grad_norm=0.0,
        optim_target_modules="all-linear",
        optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
    ),
    "galore_adamw": dict(
        optim="galore_adamw", max_grad_norm=1.0, optim_target_modules="all-linear", optim_args="rank=64"
    ),
    "galore_adafactor": dict(
        optim="galore_adafactor", max_grad_norm=1.0, optim_target_modules="all-linear", optim_args="rank=64"
    ),
    "adafactor": dict(optim="adafactor", max_grad_norm=1.0),
    "grokadamw": dict(optim="grokadamw", max_grad_norm=1.0),
    "stable_adamw": dict(optim="stable_adamw", max_grad_norm=1.0),
}
SIZES = {
    "full": dict(layers=4, hidden=256, intermediate=688, vocab=4096, seq=64, batch=4, steps=16),
    # memory: weights, gradients and optimizer state dominate (small batch, short sequences), as at scale
    "memory": dict(layers=24, hidden=512, intermediate=1376, vocab=1024, seq=16, batch=1, steps=4),
    "quick": dict(layers=2, hidden=64, intermediate=172, vocab=512, seq=32, batch=2, steps=6),
}


def _llama(size: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=size["vocab"],
            hidden_size=size["hidden"],
            intermediate_size=size["intermediate"],
            num_hidden_layers=size["layers"],
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2 * size["seq"],
            tie_word_embeddings=False,
        )
    )


def state_bytes(optimizer) -> int:
    import torch
    from torch.distributed.tensor import DTensor

    def size(value) -> int:
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if hasattr(value, "__dict__"):  # a projector object (APOLLO / GaLore) holds its matrix
            return sum(size(v) for v in vars(value).values())
        return 0

    return sum(size(entry) for entry in optimizer.state.values())


class OptimizerClock:
    """The optimizer's own CPU time in a training step, on this process's main thread (``time.thread_time``): an
    optimizer's ``step`` without its closure (forward and backward), plus what runs inside backward for the
    in-backward engine (its bucket updates and norm) and the layer-wise hooks (each parameter's step, or each FSDP2
    group's steps after the group's post-backward); collectives
    the optimizer waits on count as the time spent in them."""

    def __init__(self, optimizer) -> None:
        from lightning_optims.engines.in_backward import InBackwardOptimizer
        from lightning_optims.engines.layerwise import StepHooks

        self.spent = 0.0
        inside = ["_update_bucket", "_total_norm"] if isinstance(optimizer, InBackwardOptimizer) else []
        inside += ["_step_one"] if isinstance(optimizer, StepHooks) else []
        # (the sharded layer-wise engine steps an FSDP2 group's parameters after the group's post-backward)
        inside += ["after_group"] if hasattr(optimizer, "after_group") else []
        for name in inside:
            setattr(optimizer, name, self._timed(getattr(optimizer, name)))
        if isinstance(optimizer, StepHooks):  # (the hooks hold the method they were registered with)
            optimizer.remove_hooks()
            optimizer.register_hooks()
        step = optimizer.step

        def timed_step(closure=None, **kwargs):
            in_closure = [0.0]

            def closure_timed():
                t0 = time.thread_time()
                try:
                    return closure()
                finally:  # (the optimizer's own work inside backward is counted by its timed methods, once)
                    in_closure[0] += time.thread_time() - t0

            t0 = time.thread_time()
            try:
                return step(closure_timed if closure is not None else None, **kwargs)
            finally:
                self.spent += time.thread_time() - t0 - in_closure[0]

        optimizer.step = timed_step

    def _timed(self, method):
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.spent += time.thread_time() - t0

        return timed


def worker(label: str, size_name: str, out: str, processes: int = 2) -> None:
    """One process of a fit on ``processes`` processes (Lightning re-executes this script for the others)."""
    import _memory
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from lightning_optims import OptimizerMixin
    from tests.collectives import CollectiveCounter

    size = SIZES[size_name]
    torch.set_num_threads(1)

    class Module(OptimizerMixin, L.LightningModule):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.model = _llama(size)

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    class Measure(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.optimizer_cpu: list[float] = []
            self.collectives: list[dict] = []
            self.base = 0

        def on_train_start(self, trainer, pl_module):
            self.base = _memory.start()
            self.clock = OptimizerClock(trainer.optimizers[0])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.counter = CollectiveCounter().__enter__()
            self.spent = self.clock.spent
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.t0)
            self.optimizer_cpu.append(self.clock.spent - self.spent)
            self.counter.__exit__(None, None, None)
            self.collectives.append(self.counter.snapshot())

        def on_train_end(self, trainer, pl_module):
            result = {
                "step_s": statistics.median(self.times[2:]),
                # (the least of the steps: the optimizer's work is the same every step, and what the shared cores
                # add, waits on a descheduled peer and cache misses, only ever adds to it)
                "optimizer_cpu_s": min(self.optimizer_cpu[2:]),
                "calls": max(sum(step["calls"].values()) for step in self.collectives),
                "bytes": max(sum(step["bytes"].values()) for step in self.collectives),
                "peak_growth": _memory.growth_since(self.base),
                "state_bytes": state_bytes(trainer.optimizers[0]),
            }
            Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))

    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, size["vocab"], (size["batch"] * processes * size["steps"], size["seq"]), generator=g)
    loader = torch.utils.data.DataLoader(data, batch_size=size["batch"])
    module = Module(learning_rate=1e-3, **CONFIGS[label])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1),
        max_steps=size["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Measure()],
    )
    trainer.fit(module, loader)


def one_device_state_bytes(label: str, size_name: str) -> tuple[int, float]:
    """The optimizer state the same settings hold on one device after a step (the whole model, no sharding), and
    the largest parameter's share of all parameters."""
    import torch

    from lightning_optims import OptimizerArguments, create_optimizer

    size = SIZES[size_name]
    model = _llama(size)
    settings = {k: v for k, v in CONFIGS[label].items()}
    optimizer = create_optimizer(model, OptimizerArguments(learning_rate=1e-3, **settings), num_training_steps=10)
    batch = torch.randint(0, size["vocab"], (size["batch"], size["seq"]))
    loss = model(input_ids=batch, labels=batch).loss
    if hasattr(optimizer, "fused_backward"):
        optimizer.fused_backward(loss)
        optimizer.remove_hooks()
    else:
        if hasattr(optimizer, "train"):
            optimizer.train()
        loss.backward()
        optimizer.step()
    largest = max(p.numel() for p in model.parameters())
    if hasattr(optimizer, "optimizer_dict"):  # layer-wise: the state is in the inner optimizers
        optimizer.remove_hooks()
        held = sum(state_bytes(inner) for inner in optimizer.optimizer_dict.values())
    else:
        held = state_bytes(optimizer)
    return held, largest / sum(p.numel() for p in model.parameters())


# glibc raises its mmap threshold as large blocks are freed, after which freed blocks stay in the heap and the resident
# high-water mark counts allocator fragmentation along with what the program holds; for the memory runs it is fixed
# (large blocks are mapped and returned on free), for every optimizer alike
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_config(label: str, size_name: str, processes: int = 2, script: str = __file__) -> dict:
    """Fit ``label`` on ``processes`` processes (``script --worker``: this file, or one that adds configurations and
    sizes before calling :func:`worker`); returns the processes' figures."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(FIXED_MALLOC if size_name == "memory" else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        proc = subprocess.run(
            [sys.executable, script, "--worker", label, size_name, out, str(processes)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: {proc.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    result = {key: max(r[key] for r in ranks) for key in ranks[0]}
    # the optimizer's CPU time: every process has the same work (equal shards), so the median process's (the
    # largest of 4 draws of the noise would run above the largest of 2, and bias the ratio of 4 to 2 processes)
    result["optimizer_cpu_s"] = statistics.median(r["optimizer_cpu_s"] for r in ranks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=4)
    parser.add_argument("--out", default=str(HERE / "sharded.json"))
    args = parser.parse_args()
    if args.worker:
        label, size_name, out, processes = args.worker
        worker(label, size_name, out, int(processes))
        import torch.distributed as dist

        if dist.is_initialized():  # (gloo's threads can abort an interpreter exiting without it)
            dist.destroy_process_group()
        return
    size_name = "quick" if args.quick else "full"
    repeats = 1 if args.quick else 3
    runs: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    on_four: dict[str, list[dict]] = {label: [] for label in CONFIGS}  # (the optimizer's CPU time and traffic)
    for repeat in range(repeats):
        order = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))
        for label in order:
            runs[label].append(run_config(label, size_name))
            print(f"  {label} (repeat {repeat + 1}): {runs[label][-1]}", flush=True)
            on_four[label].append(run_config(label, size_name, processes=4))
            print(f"  {label} (repeat {repeat + 1}, 4 processes): {on_four[label][-1]}", flush=True)
    memory_size = "quick" if args.quick else "memory"
    memory = {label: run_config(label, memory_size) for label in CONFIGS}
    for label, result in memory.items():
        print(f"  {label} (memory): {result}", flush=True)
    for label in CONFIGS:
        for run_ in runs[label]:
            run_["peak_growth"] = memory[label]["peak_growth"]
    rows = {}
    base = {k: statistics.median(r[k] for r in runs["adamw_torch"]) for k in ("step_s", "peak_growth")}
    for label, results in runs.items():
        one_state, largest_share = one_device_state_bytes(label, size_name)
        step = statistics.median(r["step_s"] for r in results)
        growth = statistics.median(r["peak_growth"] for r in results)
        per_rank = max(r["state_bytes"] for r in results)
        cpu2 = statistics.median(r["optimizer_cpu_s"] for r in results)
        cpu4 = statistics.median(r["optimizer_cpu_s"] for r in on_four[label])
        rows[label] = {
            "calls": results[0]["calls"],
            "bytes": results[0]["bytes"],
            "calls_4": on_four[label][0]["calls"],
            "bytes_4": on_four[label][0]["bytes"],
            "optimizer_cpu_ms_2": 1e3 * cpu2,
            "optimizer_cpu_ms_4": 1e3 * cpu4,
            "optimizer_cpu_ratio_4_vs_2": cpu4 / cpu2 if cpu2 else None,
            "per_rank_state_bytes": per_rank,
            "one_device_state_bytes": one_state,
            "state_ratio": per_rank / one_state if one_state else None,
            "state_goal": 0.5 + largest_share,
            "step_ms": 1e3 * step,
            "step_ratio_vs_fsdp2_adamw": step / base["step_s"],
            "peak_growth_bytes": growth,
            "peak_growth_ratio_vs_fsdp2_adamw": growth / base["peak_growth"],
        }
    import lightning
    import torch

    meta = {
        "size": size_name,
        "model": SIZES[size_name],
        "memory_model": SIZES[memory_size],
        "processes": [2, 4],
        "repeats": repeats,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\nFSDP2 (ModelParallelStrategy), 2 and 4 CPU processes, gloo; model {SIZES[size_name]}")
    adamw = rows["adamw_torch"]
    print(
        "| optimizer | calls / step (AdamW's), 2 / 4 | bytes / AdamW's, 2 / 4 | optimizer CPU per process, 4 / 2 "
        "(AdamW's) | step / FSDP2 AdamW step, 2 | per-process state / one-device state (goal) | peak memory growth "
        "/ FSDP2 AdamW's |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        state = "no state" if row["state_ratio"] is None else f"{row['state_ratio']:.3f}"
        cpu = row["optimizer_cpu_ratio_4_vs_2"]
        print(
            f"| {label} | {row['calls']} ({adamw['calls']}) / {row['calls_4']} ({adamw['calls_4']}) | "
            f"{row['bytes'] / adamw['bytes']:.2f}x / {row['bytes_4'] / adamw['bytes_4']:.2f}x | "
            f"{cpu:.2f} ({row['optimizer_cpu_ms_2']:.1f} -> {row['optimizer_cpu_ms_4']:.1f} ms; AdamW "
            f"{adamw['optimizer_cpu_ratio_4_vs_2']:.2f}) | {row['step_ratio_vs_fsdp2_adamw']:.2f}x "
            f"({row['step_ms']:.0f} ms) | {state} (<= {row['state_goal']:.3f}) | "
            f"{row['peak_growth_ratio_vs_fsdp2_adamw']:.2f}x ({row['peak_growth_bytes'] / 2**20:.1f} MiB) |"
        )
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
