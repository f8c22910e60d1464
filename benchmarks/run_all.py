"""Run every benchmark and write benchmarks/RESULTS.md and benchmarks/results.png.

    python benchmarks/run_all.py            # about 15 minutes on 2 CPU cores
    python benchmarks/run_all.py --quick    # a smoke run (numbers not meaningful)

Every figure is a ratio measured side by side in one run (interleaved repeats, medians), never an absolute time
alone; the absolute medians are listed beside them for reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parameters(size: dict) -> int:
    """The parameters of benchmarks/sharded.py's Llama of ``size`` (built on the meta device: no memory, no time)."""
    import torch
    from sharded import _llama

    with torch.device("meta"):
        return sum(p.numel() for p in _llama(size).parameters())


def run(script: str, out: Path, quick: bool, reuse: bool = False) -> dict:
    if reuse and out.exists():
        print("reusing:", out)
        return json.loads(out.read_text())
    cmd = [sys.executable, str(HERE / script), "--out", str(out)] + (["--quick"] if quick else [])
    print("running:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def muon_section(muon: dict) -> list[str]:
    """Section 8: ``benchmarks/muon.py``."""
    one, cpu, loss = muon["one_device_step"], muon["sharded"], muon["loss"]
    ratio = cpu["muon"]["ratio_4_to_2"]
    return [
        "## 8. Muon (`benchmarks/muon.py`)",
        "",
        "| figure | muon | adamw_torch | ratio | goal |",
        "|---|---|---|---|---|",
        *(
            f"| one device, step time, {name} model | {row['muon'] * 1e3:.1f} ms | {row['adamw_torch'] * 1e3:.1f} ms "
            f"| {row['ratio']:.2f}x | |"
            for name, row in one.items()
        ),
        f"| FSDP2, optimizer CPU time per process, 4 processes / 2 (wide model) | {ratio:.2f} "
        f"({cpu['muon']['cpu_s_2'] * 1e3:.0f} -> {cpu['muon']['cpu_s_4'] * 1e3:.0f} ms) | "
        f"{cpu['adamw_torch']['ratio_4_to_2']:.2f} | | <= 0.65: {'met' if ratio <= 0.65 else 'not met'} |",
        f"| training loss on the corpus, mean of the last 10 of {len(muon['curves']['muon'])} steps | "
        f"{loss['muon']['last_10_mean']:.3f} | {loss['adamw_torch']['last_10_mean']:.3f} | | |",
        "",
        "One thread. The wide model's hidden matrices are 512 x 1536: the Newton-Schulz iterations (5 bfloat16 "
        "matmul rounds on the whole matrix) dominate its step on this CPU, where bfloat16 matmuls are slow; the owners "
        "divide them, so the optimizer's time per process halves from 2 processes to 4. The loss: the main job's "
        "model and data (examples/lm.py), the same learning rate (3e-3, linear schedule, 10 warm-up steps) and "
        "seed, Muon with `adjust_lr_fn=match_rms_adamw`.",
        "",
        "![muon](muon.png)",
        "",
    ]


def versions() -> str:
    import lightning
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=["integration", "lomo", "optimizer_state", "sharded", "muon"],
        help="rebuild the report from these benchmarks' existing JSON instead of running them",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    integration = run("integration.py", out / "integration.json", args.quick, "integration" in args.reuse)
    lomo = run("lomo.py", out / "lomo.json", args.quick, "lomo" in args.reuse)
    state = run("optimizer_state.py", out / "optimizer_state.json", args.quick, "optimizer_state" in args.reuse)
    sharded = run("sharded.py", out / "sharded.json", args.quick, "sharded" in args.reuse)
    muon = run("muon.py", out / "muon.json", args.quick, "muon" in args.reuse)

    ov, vs, cons, mem = (
        integration["overhead"],
        integration["vs_trainer"],
        integration["construction"],
        integration["memory"],
    )
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}: {os.cpu_count()} CPU cores, {platform.machine()}, {versions()}."
        + (
            f" Sections from {', '.join(args.reuse)} reuse the JSON of an earlier run of the same scripts (section 7 "
            "states its own date)."
            if args.reuse
            else ""
        ),
        "A shared, noisy machine: every figure is a ratio of two things measured side by side in the same run. "
        f"Sections 1-2: median over {integration['settings']['repeats']} interleaved repeats (order alternated) of the "
        f"median step of a {integration['settings']['steps']}-step fit, in CPU time of the process with one torch "
        "thread (wall time on this machine varies by +-10% between identical runs); Lightning step = "
        "`on_train_batch_start` to `on_train_batch_end`, Trainer step = `on_step_begin` to `on_step_end`.",
        "",
        "## 1. Integration overhead: OptimizerMixin / the same optimizer written by hand (goal <= 1.02x)",
        "",
        "| family | mixin step | by-hand step | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for family, row in ov.items():
        lines.append(
            f"| {family} | {row['mixin_s'] * 1e3:.1f} ms | {row['by_hand_s'] * 1e3:.1f} ms | "
            f"{row['ratio']:.3f}x | {'met' if row['ratio'] <= 1.02 else 'not met'} |"
        )
    if "noise_floor" in integration:
        nf = integration["noise_floor"]
        lines.append(
            f"| A/A control: by hand / the same by hand | {nf['a_s'] * 1e3:.1f} ms | {nf['b_s'] * 1e3:.1f} ms | "
            f"{nf['ratio']:.3f}x | (noise alone) |"
        )
    lines += [
        "",
        "By hand: `configure_optimizers` returning the same optimizer and scheduler, clipping by "
        "`Trainer(gradient_clip_val)`, schedule-free `train()`/`eval()` in `on_train_start`/`on_train_end`, LOMO by "
        "manual optimization (`LightningOptimizer.step(closure=fused_backward)`).",
        "",
        "## 2. Against transformers' Trainer (same model, data, settings, steps)",
        "",
        "| family | Lightning + mixin step | Trainer step | ratio | eval loss after (ours / Trainer) |",
        "|---|---|---|---|---|",
    ]
    for family, row in vs.items():
        lines.append(
            f"| {family} | {row['ours_s'] * 1e3:.1f} ms | {row['trainer_s'] * 1e3:.1f} ms | {row['ratio']:.2f}x | "
            f"{row['final_loss_ours']:.4f} / {row['final_loss_trainer']:.4f} |"
        )
    lines += [
        "",
        "Trainer's `lomo` is `lomo_optim.Lomo`, whose hook scans every parameter for each gradient (O(P^2)).",
        "",
        f"## 3. Construction: optimizer + scheduler for {cons['parameter_tensors']} parameter tensors",
        "",
        "| optim | ours | Trainer.create_optimizer_and_scheduler | ratio |",
        "|---|---|---|---|",
    ]
    for name in ("adamw_torch", "apollo_adamw"):
        row = cons[name]
        lines.append(
            f"| {name} | {row['ours_s'] * 1e3:.1f} ms | {row['trainer_s'] * 1e3:.1f} ms | {row['ratio']:.2f}x |"
        )
    lines += [
        "",
        "## 4. Peak memory growth of 4 training steps over the weights (one process per family)",
        "",
        "| family | growth | / adamw_torch |",
        "|---|---|---|",
    ]
    for family, row in mem.items():
        lines.append(
            f"| {family} | {row['growth'] / 2**20:.0f} MiB | {row['growth'] / mem['adamw_torch']['growth']:.2f}x |"
        )
    lines += [
        "",
        f"The model here is small ({mem['adamw_torch']['parameters'] / 1e6:.1f}M parameters): the growth is mostly "
        "activations and allocator slack. The two size-specific benchmarks follow.",
        "",
        f"## 5. LOMO (`benchmarks/lomo.py`): {lomo['step_time']['parameter_tensors']} parameter tensors, "
        f"median of {lomo['step_time']['repeats']} repeats",
        "",
        "| ratio | value | goal |",
        "|---|---|---|",
    ]
    goals = {"lomo / adamw_torch_fused": 1.0}
    for k, v in lomo["step_time"]["ratios"].items():
        goal = goals.get(k)
        verdict = "" if goal is None else (f"<= {goal}x: {'met' if v <= goal else 'not met'}")
        lines.append(f"| step time {k} | {v:.2f}x | {verdict} |")
    for k, v in lomo["memory"]["ratios"].items():
        verdict = f"<= 0.35x: {'met' if v <= 0.35 else 'not met'}" if k.startswith("lomo ") else ""
        lines.append(
            f"| peak memory growth {k} ({lomo['memory']['parameters'] / 1e6:.0f}M parameters) | {v:.2f}x | {verdict} |"
        )
    lines += [
        "",
        "## 6. Optimizer state (`benchmarks/optimizer_state.py`), targets all-linear, ratio to AdamW",
        "",
        "| model | parameters | APOLLO (rank 256) | APOLLO-Mini | GrokAdamW |",
        "|---|---|---|---|---|",
    ]
    for shape, row in state.items():
        r = row["ratio_to_adamw"]
        lines.append(
            f"| {shape} | {row['parameters'] / 1e6:,.1f}M | {r['apollo (rank 256, channel)']:.3f}x | "
            f"{r['apollo-mini (rank 1, tensor)']:.3f}x | {r['grokadamw']:.2f}x |"
        )
    m = sharded["meta"]
    adamw = sharded["rows"]["adamw_torch"]
    lines += [
        "",
        f"## 7. Sharded training (`benchmarks/sharded.py`): FSDP2 (ModelParallelStrategy), {m['processes']} CPU "
        f"processes (gloo), measured {m['date']}",
        "",
        f"Llama {m['model']} (memory: {m['memory_model']}, glibc's mmap threshold fixed so that the peak counts what "
        "the process holds, not freed blocks kept in its heap), every decoder layer and the model `fully_shard`-ed; "
        f"medians of {m['repeats']} alternating repeats; each figure is the largest of the processes' but the "
        "optimizer CPU. Calls and bytes: the most of any step (a projection renewal counts). Optimizer CPU: the "
        "optimizer's main-thread CPU time per step (its work inside backward included, once, for the in-backward "
        "and layer-wise engines), the least of a process's steps after the second (the shared cores only add to "
        "it), the median process, at 4 processes / at 2; goal: within 0.15 of AdamW's own ratio (the work divides "
        "as AdamW's does). Step time: "
        "2 processes (the 4-process runs share 2 cores); goal: at most 1.3x AdamW's.",
        "",
        "| optimizer | calls / step, 2 / 4 (AdamW's) | bytes / AdamW's, 2 / 4 | optimizer CPU, 4 / 2 | goal | "
        "step / FSDP2 AdamW step, 2 | goal | per-process state / one-device state | goal | "
        "peak memory growth / FSDP2 AdamW's | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in sharded["rows"].items():
        state_ratio = "no state" if row["state_ratio"] is None else f"{row['state_ratio']:.3f}"
        state_goal = (
            ""
            if row["state_ratio"] is None
            else f"<= {row['state_goal']:.3f}: {'met' if row['state_ratio'] <= row['state_goal'] else 'not met'}"
        )
        step_goal = f"<= 1.3x: {'met' if row['step_ratio_vs_fsdp2_adamw'] <= 1.3 else 'not met'}"
        mem_goal = (
            f"<= 0.35x: {'met' if row['peak_growth_ratio_vs_fsdp2_adamw'] <= 0.35 else 'not met'}"
            if label.startswith("lomo")
            else ""
        )
        cpu, reference = row["optimizer_cpu_ratio_4_vs_2"], adamw["optimizer_cpu_ratio_4_vs_2"]
        cpu_goal = f"<= {reference + 0.15:.2f}: {'met' if cpu <= reference + 0.15 else 'not met'}"
        lines.append(
            f"| {label} | {row['calls']} / {row['calls_4']} ({adamw['calls']} / {adamw['calls_4']}) | "
            f"{row['bytes'] / adamw['bytes']:.2f}x / {row['bytes_4'] / adamw['bytes_4']:.2f}x | {cpu:.2f} "
            f"({row['optimizer_cpu_ms_2']:.1f} -> {row['optimizer_cpu_ms_4']:.1f} ms) | {cpu_goal} | "
            f"{row['step_ratio_vs_fsdp2_adamw']:.2f}x ({row['step_ms']:.0f} ms) | {step_goal} | {state_ratio} | "
            f"{state_goal} | {row['peak_growth_ratio_vs_fsdp2_adamw']:.2f}x "
            f"({row['peak_growth_bytes'] / 2**20:.1f} MiB) | {mem_goal} |"
        )
    rows = sharded["rows"]
    if {"lomo", "lomo+clip"} <= rows.keys():
        count = parameters(m["memory_model"])
        held = 4 * count / 2  # (fp32 gradients, split over the 2 processes)
        lines += [
            "",
            f"LOMO with clipping runs `lomo_optim`'s norm pass, a second backward: {rows['lomo+clip']['step_ms']:.0f} "
            f"ms against LOMO's {rows['lomo']['step_ms']:.0f} ms without it. One backward would hold every reduced "
            f"gradient shard until the norm is known: {held / 2**20:.1f} MiB per process on the memory model (its "
            f"{count / 1e6:.1f}M parameters in fp32 over 2 processes), where LOMO's whole "
            f"peak growth is {rows['lomo+clip']['peak_growth_bytes'] / 2**20:.1f} MiB with clipping.",
        ]
    lines += ["", "![results](results.png)", ""]
    lines += muon_section(muon)
    (out / "RESULTS.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fams = list(ov)
    axes[0].bar(fams, [ov[f]["ratio"] for f in fams], color="tab:blue")
    axes[0].axhline(1.02, color="red", linestyle="--", label="goal 1.02x")
    axes[0].axhline(1.0, color="gray", linewidth=0.8)
    axes[0].set_ylim(0.8, max(1.2, max(ov[f]["ratio"] for f in fams) + 0.05))
    axes[0].set_title("step time: OptimizerMixin / by hand")
    axes[0].legend()
    axes[1].bar(list(vs), [vs[f]["ratio"] for f in vs], color="tab:orange")
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    axes[1].set_yscale("log")
    axes[1].set_title("step time: Lightning + mixin / transformers Trainer (log)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
