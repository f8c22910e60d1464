"""Optimizer-state bytes of APOLLO, APOLLO-Mini, GrokAdamW and AdamW on a Llama-shaped model, as ratios to AdamW.

The model is built from a ``LlamaConfig`` on the meta device (a 7B shape does not fit this machine in fp32 with its
AdamW state). Parameters are grouped exactly as ``create_optimizer`` groups them (targets: ``all-linear``); then, for
each distinct (shape, group) pair, a real parameter of that shape takes two optimizer steps on the CPU with a random
gradient and the bytes of its state are measured (every tensor in ``optimizer.state[p]``, projector matrices
included), times the number of parameters of that shape. Embeddings and ``lm_head`` are not targets: they carry
full AdamW state under APOLLO, and that is counted.

    python benchmarks/optimizer_state.py  # Llama-2-7B shape and the example model; writes optimizer_state.json
    python benchmarks/optimizer_state.py --quick    # a 1B-ish shape only
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, LlamaForCausalLM

from lightning_optims import OptimizerArguments, create_optimizer
from lightning_optims.param_groups import low_rank_param_groups, target_parameter_names

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "adamw_torch": dict(optim="adamw_torch"),
    "apollo (rank 256, channel)": dict(
        optim="apollo_adamw",
        optim_target_modules="all-linear",
        optim_args="proj=random,rank=256,scale_type=channel,scale=1.0",
    ),
    "apollo-mini (rank 1, tensor)": dict(
        optim="apollo_adamw",
        optim_target_modules="all-linear",
        optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
    ),
    "grokadamw": dict(optim="grokadamw"),
}
SHAPES = {
    "llama-2-7b": LlamaConfig(),  # hidden 4096, intermediate 11008, 32 layers, vocab 32000
    "llama-1b-ish": LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "example (examples/lm.py)": LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):  # a projector object
        return sum(_tensor_bytes(v) for v in vars(obj).values())
    return 0


def state_bytes(config: LlamaConfig, settings: dict) -> tuple[int, int]:
    """(state bytes, parameter count) for the model of ``config`` under ``settings``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    args = OptimizerArguments(**settings)
    if args.optim_target_modules is not None:
        names = target_parameter_names(model, args.optim_target_modules, args.optim)
        groups = low_rank_param_groups(model, names, {"target": True})  # the targets, as create_optimizer decides
        kinds = [(tuple(p.shape), i == 1) for i, g in enumerate(groups) for p in g["params"]]
    else:
        kinds = [(tuple(p.shape), False) for p in model.parameters()]
    total = 0
    for (shape, target), count in Counter(kinds).items():
        total += count * _one_parameter_state(shape, target, args)
    return total, sum(p.numel() for p in model.parameters())


def _one_parameter_state(shape: tuple[int, ...], target: bool, args: OptimizerArguments) -> int:
    """Two real steps on one parameter of this shape, in the group it belongs to; the bytes of its state."""

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if target:  # a Linear, so that all-linear targets it
                self.proj = torch.nn.Linear(shape[1], shape[0], bias=False)
            else:
                self.weight = torch.nn.Parameter(torch.empty(shape))

    module = One()
    p = next(module.parameters())
    if args.optim_target_modules is not None and not target:
        # a non-target parameter: a lone parameter that no all-linear rule selects needs a dummy target to build
        module.dummy = torch.nn.Linear(2, 2, bias=False)
    optimizer = create_optimizer(module, args)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for q in module.parameters():
            q.grad = torch.randn(q.shape, generator=g)
        optimizer.step()
    return _tensor_bytes(optimizer.state[p])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "optimizer_state.json"))
    args = parser.parse_args()
    shapes = {"llama-1b-ish": SHAPES["llama-1b-ish"]} if args.quick else SHAPES
    result = {}
    for shape_name, config in shapes.items():
        rows = {name: state_bytes(config, settings) for name, settings in SETTINGS.items()}
        adamw = rows["adamw_torch"][0]
        params = rows["adamw_torch"][1]
        result[shape_name] = {
            "parameters": params,
            "state_bytes": {k: v[0] for k, v in rows.items()},
            "ratio_to_adamw": {k: v[0] / adamw for k, v in rows.items()},
        }
        print(f"{shape_name}: {params / 1e6:,.1f}M parameters")
        for name, (nbytes, _) in rows.items():
            print(f"    {name:32s} {nbytes / 2**30:8.3f} GiB   {nbytes / adamw:6.3f}x AdamW")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
