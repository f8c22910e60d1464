"""Strategies and precision: ModelParallel (FSDP2) on two CPU processes for the families that support sharded
parameters, refusals for the rest (FSDP, DeepSpeed, ModelParallel), bf16-mixed for every family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_optims import available_optimizers, compat, get_spec, rules
from tests.helpers import LlamaModule, launch_failure, lightning_trainer, loader, needs, tiny_llama
from tests.test_reliability import settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "model_parallel_fit.py"
USABLE = [r.name for r in available_optimizers() if r.usable]
ELEMENTWISE = [n for n in USABLE if get_spec(n).elementwise]
NOT_ELEMENTWISE = [n for n in USABLE if not get_spec(n).elementwise]
SHARDS_IN_BACKWARD = [n for n in USABLE if getattr(get_spec(n).sharding, "how", None) == "in_backward"]
# stepped after backward on FSDP2's shards: by the family's own sharded step, or gathered
SHARDS_AFTER_BACKWARD = [n for n in USABLE if get_spec(n).runs_sharded and n not in SHARDS_IN_BACKWARD]


# the fits of tests/scripts/model_parallel_fit.py: FSDP2 equal to one process (the torch and schedule-free families),
# tensor parallelism with plain parameters equal to one process (torch's optimizers that step each tensor on its own,
# and the families whose sharded step takes any placement), and what is refused when fit starts
SHARDED_EQUAL = ["adamw_torch", "sgd", "schedule_free_adamw"]
TP_EQUAL = ["adamw_torch", "sgd", "adafactor", "stable_adamw", "grokadamw", "lomo", "adalomo", "galore_adafactor"]
FSDP2_FULL_PROJECTION = ["galore_adafactor", "apollo_adamw"]
TP_REFUSED = [
    (
        "galore_adafactor_layerwise",
        None,
        "optim='galore_adafactor_layerwise' cannot run on this layout: tensor parallel ('net.3.weight'",
    ),
    (
        "galore_adamw",
        "rank=2,proj_type=full",
        "optim='galore_adamw' with optim_args proj_type='full' cannot run on this layout: tensor parallel",
    ),
    (
        "schedule_free_adamw",
        None,
        "optim='schedule_free_adamw' steps each param group with one fused / foreach kernel",
    ),
]


def _launch(out: Path, mode: str, runs: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode, *runs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, launch_failure(proc.stderr)


@pytest.fixture(scope="module")
def model_parallel_runs(tmp_path_factory) -> Path:
    """Two launches for every fit of this module: two processes under ModelParallelStrategy (FSDP2, a
    configure_model that shards nothing, tensor parallelism; one fit after the other in the same processes), and one
    process on the combined batches; returns the folder of their weights and refusals."""
    out = tmp_path_factory.mktemp("model_parallel")
    fsdp2 = compat.missing("fsdp2_on_gloo") is None  # (an older torch: its FSDP2 fits are refused, below)
    parallel = [f"sharded-{name}:{name}:sharded" for name in SHARDED_EQUAL] if fsdp2 else []
    parallel += ["refused-gloo:adamw_torch:sharded"] if not fsdp2 else []
    parallel += [f"tp-{name}:{name}:tp" for name in TP_EQUAL]
    parallel += ["refused-4bit:adamw_torch_4bit:sharded", "refused-unsharded:adamw_torch:unsharded"]
    parallel += [f"refused-full-{name}:{name}:sharded:rank=2,proj_type=full" for name in FSDP2_FULL_PROJECTION]
    parallel += [f"refused-tp-{name}:{name}:tp" + (f":{args}" if args else "") for name, args, _ in TP_REFUSED]
    _launch(out, "parallel", parallel)
    singles = dict.fromkeys((SHARDED_EQUAL if fsdp2 else []) + TP_EQUAL)
    _launch(out, "single", [f"single-{name}:{name}:single" for name in singles])
    return out


def _weights(out: Path, name: str) -> dict:
    errors = [path.read_text() for path in sorted(out.glob(f"{name}.error.rank*"))]
    assert not errors, errors
    return torch.load(out / f"{name}.pt", weights_only=True)


def _assert_same_grad_norms(a: dict, b: dict) -> None:
    """The global gradient norm each run measured (and logged) at every step, within 1e-5 relative: the norm that
    clips must span every parameter, on every mesh and plain (a norm that left some out, or added the meshes' norms
    instead of their squares, is off by far more)."""
    norms_a, norms_b = a.pop("grad_norms"), b.pop("grad_norms")
    assert len(norms_a) == len(norms_b) > 0
    torch.testing.assert_close(norms_a, norms_b, rtol=1e-5, atol=0)


def _refusal(out: Path, name: str) -> str:
    """The one message with which both processes stopped; nothing written."""
    errors = [path.read_text() for path in sorted(out.glob(f"{name}.error.rank*"))]
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert not (out / f"{name}.pt").exists()
    return errors[0]


@pytest.mark.slow
@needs("fsdp2_on_gloo")
@pytest.mark.parametrize("name", SHARDED_EQUAL)
def test_model_parallel_two_cpu_processes_equal_one(model_parallel_runs, name):
    a, b = _weights(model_parallel_runs, f"sharded-{name}"), _weights(model_parallel_runs, f"single-{name}")
    _assert_same_grad_norms(a, b)
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{name} {key}: {m}")


@pytest.mark.slow
def test_fsdp2_on_gloo_is_refused_below_its_torch(model_parallel_runs):
    """torch's FSDP2 fails on gloo in 2.6 and sums instead of averaging in 2.7: there, a fit with fully_shard on the
    CPU stops when it starts, naming both versions; from 2.13 it trains (the test above)."""
    needs = compat.missing("fsdp2_on_gloo")
    if needs is None:
        assert not list(model_parallel_runs.glob("refused-gloo.*"))  # (not launched: nothing to refuse)
        assert _weights(model_parallel_runs, "sharded-adamw_torch")
    else:
        assert f"ModelParallelStrategy on the CPU with fully_shard: {needs}" in _refusal(
            model_parallel_runs, "refused-gloo"
        )


@pytest.mark.slow
def test_model_parallel_refuses_a_blockwise_quantized_optimizer_end_to_end(model_parallel_runs):
    """torchao's 4-bit AdamW quantizes blocks of a flattened tensor: refused when fit starts, in our words."""
    message = _refusal(model_parallel_runs, "refused-4bit")
    assert "optim='adamw_torch_4bit' is not supported under ModelParallelStrategy" in message


@pytest.mark.slow
def test_model_parallel_without_fully_shard_is_refused(model_parallel_runs):
    """ModelParallelStrategy only asks for a configure_model; one that shards nothing would leave every process
    training its own copy (nothing averages the gradients): refused when fit starts."""
    assert (
        "ModelParallelStrategy with 2 processes, and no parameter of ShardedMLP is sharded: configure_model must "
        "call fully_shard" in _refusal(model_parallel_runs, "refused-unsharded")
    )


def stand_in_trainer(strategy) -> SimpleNamespace:
    """What the rules read of a Trainer (FSDP and DeepSpeed cannot be set up without CUDA here). Two processes; one
    under ModelParallelStrategy, where two would need the model sharded (``model_parallel_without_sharding``)."""
    return SimpleNamespace(
        strategy=strategy,
        gradient_clip_val=None,
        accumulate_grad_batches=1,
        world_size=1 if isinstance(strategy, ModelParallelStrategy) else 2,
        precision_plugin=SimpleNamespace(),
        estimated_stepping_batches=10,
        callbacks=[],
    )


STRATEGIES = {
    "FSDPStrategy": lambda: FSDPStrategy(),
    "DeepSpeedStrategy": lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy),  # its __init__ needs deepspeed
    "ModelParallelStrategy": lambda: ModelParallelStrategy(),
}


REFUSED = [
    (strategy, name)
    for strategy in STRATEGIES
    for name in NOT_ELEMENTWISE
    if not (strategy == "ModelParallelStrategy" and name in SHARDS_IN_BACKWARD + SHARDS_AFTER_BACKWARD)
]
# (those run under ModelParallelStrategy: tests/test_sharded.py)


@pytest.mark.parametrize(("strategy", "name"), REFUSED)
def test_sharded_strategies_refuse_whole_tensor_optimizers(strategy, name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    with pytest.raises(MisconfigurationException) as info:
        rules.check(stand_in_trainer(STRATEGIES[strategy]()), module)
    message = str(info.value)
    assert f"optim={name!r}" in message and strategy in message  # the optimizer and the strategy
    assert "adamw_torch" in message or "DDP" in message  # and the alternative


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_sharded_strategies_accept_elementwise_optimizers(strategy, name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    rules.check(stand_in_trainer(STRATEGIES[strategy]()), module)


@pytest.mark.slow
@pytest.mark.parametrize("name", USABLE)
def test_bf16_mixed_every_family(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    # 6 steps: schedule-free RAdam makes no update in its first steps (until RAdam's rectification is defined)
    trainer = lightning_trainer(6, precision="bf16-mixed")
    trainer.fit(module, loader())
    assert trainer.global_step == 6
    weights = module.model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not torch.equal(weights["lm_head.weight"], tiny_llama().state_dict()["lm_head.weight"])


def test_16_mixed_on_cpu_is_bf16():
    """Lightning runs precision='16-mixed' on the CPU as bf16 (no GradScaler): the in-backward optimizers work."""
    trainer = lightning_trainer(2, precision="16-mixed")
    module = LlamaModule(model=tiny_llama(), **settings("lomo"))
    trainer.fit(module, loader())
    assert getattr(trainer.precision_plugin, "scaler", None) is None and trainer.global_step == 2


@pytest.mark.parametrize("name", SHARDS_IN_BACKWARD + SHARDS_AFTER_BACKWARD)
def test_sharded_optimizers_are_accepted_under_model_parallel_and_point_there_from_fsdp1(name):
    module = LlamaModule(model=tiny_llama(), **settings(name))
    rules.check(stand_in_trainer(ModelParallelStrategy()), module)
    for strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
        with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
            rules.check(stand_in_trainer(STRATEGIES[strategy]()), module)


def test_layerwise_under_ddp_is_refused_and_points_to_model_parallel():
    """DDP averages a gradient after the hook that steps its parameter; FSDP2 reduces it before (tests/test_sharded)."""
    module = LlamaModule(model=tiny_llama(), **settings("apollo_adamw_layerwise"))
    with pytest.raises(MisconfigurationException, match="optim='apollo_adamw_layerwise' steps each parameter") as info:
        rules.check(stand_in_trainer(DDPStrategy()), module)
    assert "DDPStrategy with 2 processes" in str(info.value) and "ModelParallelStrategy" in str(info.value)


def test_finetuning_callbacks_are_refused_under_model_parallel():
    """BackboneFinetuning under FSDP2 hangs (measured, also without this package): refused in our words."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    module = LlamaModule(model=tiny_llama(), **settings("adamw_torch"))
    trainer = stand_in_trainer(ModelParallelStrategy())
    trainer.callbacks = [BackboneFinetuning()]
    with pytest.raises(
        MisconfigurationException, match="BackboneFinetuning cannot be used under ModelParallelStrategy"
    ):
        rules.check(trainer, module)
    trainer = stand_in_trainer(DDPStrategy())
    trainer.callbacks = [BackboneFinetuning()]
    rules.check(trainer, module)  # (DDP: tested in tests/test_lightning_tools.py)


# -- layouts beyond FSDP2 on dim 0 (1-D, or HSDP) -------------------------------------------------------------------

LAYOUT_SCRIPT = ROOT / "tests" / "scripts" / "layouts.py"
LAYOUT_NAMES = {"fsdp2": "FSDP2", "hsdp": "HSDP", "tp": "tensor parallel", "2d": "2-D (tensor parallel + FSDP2)"}
ON_SHARDS = SHARDS_IN_BACKWARD + SHARDS_AFTER_BACKWARD


@pytest.fixture(scope="module")
def layouts() -> dict:
    """Every layout built on one process (mesh dimensions of size 1) with every optimizer that runs under
    ModelParallelStrategy, and the rules' verdict (one script run)."""
    import json

    names = [*ELEMENTWISE, *ON_SHARDS]
    proc = subprocess.run(
        [sys.executable, str(LAYOUT_SCRIPT), *names], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, launch_failure(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("name", ELEMENTWISE + ON_SHARDS)
def test_each_layout_is_named_and_what_cannot_run_on_it_is_refused(layouts, layout, name):
    found = layouts[f"{layout} {name}"]
    assert found["layout"][0] == LAYOUT_NAMES[layout]
    gloo = compat.missing("fsdp2_on_gloo")
    if layout != "tp" and gloo and found["message"] and "ModelParallelStrategy on the CPU" in found["message"]:
        assert f"ModelParallelStrategy on the CPU with fully_shard: {gloo}" in found["message"]
        assert rules._runs_on(get_spec(name), LAYOUT_NAMES[layout])  # (what would run here is refused for torch)
    elif layout == "tp" and get_spec(name).one_kernel_per_group:  # (the embeddings, norms and head: plain tensors)
        assert found["message"].startswith(f"MisconfigurationException: optim={name!r} steps each param group with")
    elif rules._runs_on(get_spec(name), LAYOUT_NAMES[layout]):
        assert found["message"] is None  # (on 2 and 4 processes: tests/test_sharded.py)
    else:  # the optimizer, the layout as the user built it, and what works instead
        message = found["message"]
        assert message.startswith(f"MisconfigurationException: optim={name!r} cannot run on this layout: ")
        assert f"{LAYOUT_NAMES[layout]} ('model.model." in message and "adamw_torch" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_EQUAL)
def test_tensor_parallel_with_plain_parameters_clips_the_global_norm_and_equals_one_process(model_parallel_runs, name):
    """Only two layers parallelised (ColwiseParallel, RowwiseParallel), the LayerNorm and the last layer left plain
    tensors, max_grad_norm=1.0: the norm spans both meshes (torch's clipping crashes on the mix)."""
    a, b = _weights(model_parallel_runs, f"tp-{name}"), _weights(model_parallel_runs, f"single-{name}")
    _assert_same_grad_norms(a, b)
    assert a.keys() == b.keys()
    for key in a:  # (measured 4.5e-8 for AdamW: the row-parallel layer sums its two halves in another order)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP2_FULL_PROJECTION)
def test_fsdp2_refuses_a_projection_on_both_sides_when_fit_starts(model_parallel_runs, name):
    """GaLore's proj_type='full' has no block step (before the block steps took every other proj_type it was stepped
    on gathered whole tensors): refused when fit starts, naming the layout; APOLLO's, which apollo_torch does not
    implement (NotImplementedError at the first step, on any device), as a bad optim_args value."""
    message = _refusal(model_parallel_runs, f"refused-full-{name}")
    expected = (
        f"optim={name!r} with optim_args proj_type='full' cannot run on this layout: FSDP2"
        if name.startswith("galore")
        else "proj_type='full' for apollo_adamw: accepted values are 'std', 'reverse_std', 'right', 'left'"
    )
    assert expected in message


@pytest.mark.slow
@pytest.mark.parametrize(("name", "optim_args", "refusal"), TP_REFUSED)
def test_tensor_parallel_refuses_what_cannot_run_when_fit_starts(model_parallel_runs, name, optim_args, refusal):
    """A layer-wise name: its engine steps an FSDP2 group at a time; GaLore with proj_type='full': no block step
    for a projection on both sides (without the rule: a ValueError from the optimizer's constructor); schedule-free
    (and fused AdamW): one kernel over a group mixing DTensors and plain tensors, which torch refuses at the first step
    (measured without the rule: RuntimeError "aten._foreach_mul_.Scalar got mixed torch.Tensor and DTensor")."""
    assert refusal in _refusal(model_parallel_runs, f"refused-tp-{name}")


@pytest.mark.parametrize("name", ["lomo", "adalomo", "apollo_adamw_layerwise"])
def test_a_grad_scaler_is_refused_for_in_backward_optimizers_when_fit_starts(name):
    """On a GPU, precision='16-mixed' brings a GradScaler, which checks gradients after backward: none is left by an
    optimizer that updates inside it. The rule, on the CPU: a mixed-precision plugin holding a CPU GradScaler stands
    in for CUDA's (tests/gpu runs the real one)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = LlamaModule(model=tiny_llama(), **settings(name))
    with pytest.raises(MisconfigurationException, match=rf"\(a GradScaler\) cannot drive optim='{name}'"):
        lightning_trainer(1, plugins=[plugin]).fit(module, loader())


def test_a_grad_scaler_drives_an_optimizer_that_keeps_its_gradients():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = LlamaModule(model=tiny_llama(), **settings("adamw_torch"))
    trainer = lightning_trainer(2, plugins=[plugin])
    trainer.fit(module, loader())
    assert trainer.global_step == 2
