"""Sharded training (ModelParallelStrategy, FSDP2) of the memory-saving optimizers: two CPU processes (gloo) whose
tiny Llama has every decoder layer and the model ``fully_shard``-ed end with the full weights of one process on the
combined batches, with ``max_grad_norm`` 1.0 and 0, and an epoch-boundary resume from Lightning's distributed
checkpoint equals the uninterrupted run.

- LOMO / AdaLomo update the shards in FSDP2's hooks; the global norm and AdaLomo's row / column statistics and RMS
  are completed over the shards (with shard-local statistics the results differ: the control below).
- Adafactor, APOLLO (channel and tensor scaling, projections renewed every 2 steps), GaLore, GrokAdamW and
  StableAdamW step whole tensors gathered from the shards (GatheredStepOptimizer), their state kept sharded; the
  layer-wise APOLLO / GaLore do the same step for each parameter in FSDP2's hook (GatheredLayerwiseOptimizer).

All sharded fits run in one two-process launch (Lightning runs successive fits in the processes it launched); the
one-process references run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_llama_fit.py"
# stepped after backward (ShardedAdafactor on the shards; the others through GatheredStepOptimizer, or on rows)
GATHERED = ["adafactor", "apollo_adamw", "apollo_mini", "galore_adamw", "galore_adafactor", "grokadamw", "stable_adamw"]
# layer-wise: each parameter's gathered step in FSDP2's hook (no global clipping: max_grad_norm 0, as transformers)
LAYERWISE = ["apollo_adamw_layerwise", "galore_adamw_layerwise", "galore_adafactor_layerwise"]
OPTIMIZERS = ["lomo", "adalomo", *GATHERED, *LAYERWISE]
NORMS = ["1.0", "0"]


def _norms(optim: str) -> list[str]:
    return ["0"] if optim in LAYERWISE else NORMS


def _resumed_norm(optim: str) -> str:
    return _norms(optim)[0]  # the run saved at each epoch end, and resumed


CONTROLS = [
    ("lomo", "1.0"),
    ("adalomo", "0"),
    ("adafactor", "1.0"),
    ("stable_adamw", "1.0"),
    ("grokadamw", "1.0"),
    ("apollo_mini", "0"),
    ("galore_adamw_layerwise", "0"),
]
# a parameter unused on one process (and, in another step, on every process): one optimizer per family, the
# in-backward ones with and without clipping
UNUSED = [
    ("adamw_torch", "1.0"),
    ("schedule_free_adamw", "0"),
    ("adafactor", "1.0"),
    ("apollo_mini", "1.0"),
    ("grokadamw", "0"),
    ("lomo", "1.0"),
    ("adalomo", "0"),
]


# the collectives of a step, against FSDP2 AdamW's in the same launch (tests/collectives.py counts them)
COLLECTIVE_REFERENCES = [("adamw_torch", "1.0"), ("adamw_torch", "0"), ("schedule_free_adamw", "0")]
FSDP_GROUPS = 3  # fully_shard on each of the two decoder layers and on the model (tests/scripts/sharded_llama_fit.py)
# within AdamW's bound: LOMO / AdaLomo without clipping (with clipping their norm pass is a second backward, which
# FSDP2 all-gathers and reduce-scatters again), an elementwise optimizer, and the families with their own sharded
# step or step on rows
LIKE_ADAMW = [
    ("lomo", "0"),
    ("adalomo", "0"),
    ("schedule_free_adamw", "0"),
    ("adafactor", "0"),
    ("adafactor", "1.0"),
    ("stable_adamw", "0"),
    ("stable_adamw", "1.0"),
    ("grokadamw", "0"),
    ("grokadamw", "1.0"),
    ("apollo_mini", "0"),
    ("apollo_mini", "1.0"),
    ("apollo_adamw", "1.0"),
]
# no gather of a parameter, gradient or state beyond FSDP2's own all-gathers of the parameters (the layer-wise step
# on rows runs in each parameter's hook: its sums cannot be batched over the step, so it issues more calls)
NO_GATHER = [
    *LIKE_ADAMW,
    ("apollo_adamw_layerwise", "0"),
    ("galore_adamw", "0"),
    ("galore_adamw", "1.0"),
    ("galore_adamw_layerwise", "0"),
]


def _name(optim: str, norm: str, kind: str = "") -> str:
    return f"{optim}-{norm.replace('.', '_')}{kind}"


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    """One launch of two processes for every sharded fit of this module; returns the folder of their weights."""
    out = tmp_path_factory.mktemp("sharded")
    runs = []
    for optim in OPTIMIZERS:
        for norm in _norms(optim):
            runs.append(f"{_name(optim, norm)}:{optim}:{norm}" + (":ckpt" if norm == _resumed_norm(optim) else ""))
        norm = _resumed_norm(optim)
        runs.append(f"{_name(optim, norm, '-resumed')}:{optim}:{norm}:resume={_name(optim, norm)}")
    runs += [f"{_name(optim, norm, '-local')}:{optim}:{norm}:local" for optim, norm in CONTROLS]
    runs += [f"{_name(optim, norm, '-unused')}:{optim}:{norm}:unused" for optim, norm in UNUSED]
    runs.append(f"{_name('adamw_torch', '1.0', '-unused-torch')}:adamw_torch:1.0:unused-torch")
    runs += [f"{_name(optim, norm)}:{optim}:{norm}" for optim, norm in COLLECTIVE_REFERENCES]
    _launch(out, runs, processes=2)
    return out


def _launch(out: Path, runs: list[str], processes: int) -> None:
    env = {**os.environ, "SHARDED_TEST_PROCESSES": str(processes)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "sharded", *runs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.fixture(scope="module")
def resharded_runs(sharded_runs) -> Path:
    """Resumes on another number of processes: one FSDP2 process resumes each two-process epoch-0 checkpoint and
    saves its own run's checkpoints, which two processes then resume."""
    on_one = []
    for optim in OPTIMIZERS:
        norm = _resumed_norm(optim)
        on_one.append(f"{_name(optim, norm, '-2to1')}:{optim}:{norm}:resume={_name(optim, norm)}")
        on_one.append(f"{_name(optim, norm, '-one')}:{optim}:{norm}:ckpt")
    _launch(sharded_runs, on_one, processes=1)
    on_two = [
        f"{_name(o, _resumed_norm(o), '-1to2')}:{o}:{_resumed_norm(o)}:resume={_name(o, _resumed_norm(o), '-one')}"
        for o in OPTIMIZERS
    ]
    _launch(sharded_runs, on_two, processes=2)
    return sharded_runs


def _script():
    spec = importlib.util.spec_from_file_location("sharded_llama_fit", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def single_process(optim: str, norm: str, out: Path, option: str = "") -> dict[str, torch.Tensor]:
    """The reference, in this process: one process on the combined batches, same script."""
    _script().main(str(out), "single", f"single:{optim}:{norm}:{option}")
    return torch.load(out / "single.pt", weights_only=True)


def grad_norms(folder: Path, name: str) -> list[float]:
    return json.loads((folder / f"{name}.norms").read_text())


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{name}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "norm"), [(optim, norm) for optim in OPTIMIZERS for norm in _norms(optim)])
def test_fsdp2_two_processes_equal_one_process(sharded_runs, tmp_path, optim, norm):
    """The optimizers stepped after backward (``GATHERED``) are compared with one process that accumulates each step's
    gradient over the two processes' halves of the batch, in their order: the same sums FSDP2 does. (Against one
    matmul over the whole batch the gradients round differently, by ~5e-10, and Adam-type updates, which normalise
    each element, amplify that where an element's gradient is tiny: GrokAdamW ended 2.4e-5 away after 4 steps on
    this machine's CPU, deterministically; another CPU's matmul kernels round elsewhere, which is how this test once
    failed by chance.) Adafactor, StableAdamW and GrokAdamW step on the shards themselves, their sums (column sums,
    RMS, per-tensor norms) adding the processes' parts; APOLLO and GaLore step their elementwise groups and APOLLO's
    random projections on each process's rows; GaLore's projections on gathered whole tensors: all within 1e-5
    (measured 3e-8 to 2e-6); with clipping the global norm is summed over the shards in another order. The
    in-backward and layer-wise optimizers cannot accumulate: one process on the whole batch, within 1e-5 (measured 4e-9
    to 2e-6)."""
    micro = optim in GATHERED
    sharded = weights(sharded_runs, _name(optim, norm))
    single = single_process(optim, norm, tmp_path, "micro" if micro else "")
    initial = tiny_llama().state_dict()
    assert sharded.keys() == single.keys() == initial.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        assert not torch.equal(single[key], initial[key]) or "rotary" in key, f"{key} was not trained"
    # grad_norm, logged at each step: the global norm before clipping, as one process has it
    norms, single_norms = grad_norms(sharded_runs, _name(optim, norm)), grad_norms(tmp_path, "single")
    assert len(norms) == len(single_norms) == 4 and all(n > 0 for n in norms)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(single_norms), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_fsdp2_resume_from_epoch_boundary_equals_uninterrupted(sharded_runs, optim):
    """Lightning's distributed checkpoint of the sharded module and optimizer (every state tensor sharded on its dim
    0: AdaLomo's row statistics, APOLLO's projected moments and projection matrices, ...), loaded by a new Trainer."""
    norm = _resumed_norm(optim)
    assert (sharded_runs / f"{_name(optim, norm)}-ckpt" / "epoch=0.ckpt").exists()
    steps = {kind: int((sharded_runs / f"{_name(optim, norm, kind)}.steps").read_text()) for kind in ("", "-resumed")}
    assert steps == {"": 4, "-resumed": 2}  # the resumed fit started at the epoch boundary, not from scratch
    full, resumed = weights(sharded_runs, _name(optim, norm)), weights(sharded_runs, _name(optim, norm, "-resumed"))
    for key in full:
        # the same processes and sums as the uninterrupted run: bit-identical
        assert torch.equal(resumed[key], full[key]), f"{key}: {(resumed[key] - full[key]).abs().max()}"


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_fsdp2_resume_on_another_number_of_processes(resharded_runs, optim):
    """The state is saved per parameter name, sharded like the parameters (torch's distributed checkpoint reshards
    it): a two-process checkpoint resumed by one process, and a one-process checkpoint resumed by two, end where the
    uninterrupted runs end (within 1e-5: the reductions add in another order)."""
    norm = _resumed_norm(optim)
    for resumed, uninterrupted in (("-2to1", ""), ("-1to2", "-one")):
        steps = int((resharded_runs / f"{_name(optim, norm, resumed)}.steps").read_text())
        assert steps == 2, resumed  # resumed at the epoch boundary
        full = weights(resharded_runs, _name(optim, norm, uninterrupted))
        other = weights(resharded_runs, _name(optim, norm, resumed))
        for key in full:
            torch.testing.assert_close(
                other[key],
                full[key],
                atol=1e-5,
                rtol=0,
                msg=lambda m, resumed=resumed, key=key: f"{resumed} {key}: {m}",
            )


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "norm"), CONTROLS)
def test_shard_local_statistics_would_differ(sharded_runs, tmp_path, optim, norm):
    """The control: the same run with each process's statistics left shard-local (LOMO's clipping norm, AdaLomo's
    column means and RMS; the gathered optimizers stepping this process's rows alone: Adafactor's factored moments,
    APOLLO's norms and projections, GaLore's projections) ends measurably away from one process, so the equality
    tests above can fail."""
    local, single = weights(sharded_runs, _name(optim, norm, "-local")), single_process(optim, norm, tmp_path)
    worst = max(float((local[k] - single[k]).abs().max()) for k in single)
    assert worst > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "norm"), UNUSED)
def test_fsdp2_parameter_unused_on_some_processes_equals_one_process(sharded_runs, tmp_path, optim, norm):
    """The head ``aux`` (in FSDP2's root group with the embeddings) is used by sample 0 only: at step 0 of each epoch
    one process uses it and the other not, at step 1 no process does. With FSDP2's
    ``set_reduce_scatter_unused_params(True)`` in ``configure_model`` every family ends with one process's weights
    (the head trained, and left alone in the steps where nobody used it)."""
    sharded = weights(sharded_runs, _name(optim, norm, "-unused"))
    single = single_process(optim, norm, tmp_path, "unused")
    initial = _script().AuxNet().state_dict()
    assert sharded.keys() == single.keys() == initial.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert not torch.equal(single["aux.weight"], initial["aux.weight"])  # the head was trained


@pytest.mark.slow
def test_fsdp2_zero_gradients_for_unused_parameters_would_differ(sharded_runs, tmp_path):
    """The control: with torch's switch alone, FSDP2 gives the head a zero gradient in the step where no process used
    it, and AdamW (momentum, weight decay) moves it where one process leaves it alone."""
    torch_only = weights(sharded_runs, _name("adamw_torch", "1.0", "-unused-torch"))
    single = single_process("adamw_torch", "1.0", tmp_path, "unused")
    assert float((torch_only["aux.weight"] - single["aux.weight"]).abs().max()) > 1e-4


@pytest.mark.slow
def test_fsdp2_unused_parameter_without_the_switch_is_named(tmp_path):
    """Without set_reduce_scatter_unused_params(True), FSDP2's reduce-scatter fails when one process used the head and
    the other not; the warning before it names the parameter and the switch."""
    env = {**os.environ, "SHARDED_TEST_UNUSED_SWITCH": "0"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "sharded", "x:adamw_torch:1.0:unused"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode != 0
    assert "FSDP2: parameter aux.weight got no gradient on this process in this backward" in proc.stderr
    assert "set_reduce_scatter_unused_params(True)" in proc.stderr


# -- what a step communicates -----------------------------------------------------------------------------------------


def collectives(folder: Path, name: str) -> list[dict]:
    """Per training step of the first process: ``{"calls": {kind: n}, "bytes": {kind: n}}``."""
    return json.loads((folder / f"{name}.collectives").read_text())


def _most(steps: list[dict], what: str) -> int:
    return max(sum(step[what].values()) for step in steps)


@pytest.mark.parametrize(("optim", "norm"), LIKE_ADAMW)
def test_a_step_communicates_within_adamws_bound(sharded_runs, optim, norm):
    """Calls per step at most FSDP2 AdamW's plus 2 per FSDP group, bytes at most 1.05x (deterministic counts)."""
    ours, adamw = collectives(sharded_runs, _name(optim, norm)), collectives(sharded_runs, _name("adamw_torch", norm))
    assert len(ours) == len(adamw) == 4
    assert _most(ours, "calls") <= _most(adamw, "calls") + 2 * FSDP_GROUPS
    assert _most(ours, "bytes") <= 1.05 * _most(adamw, "bytes")


@pytest.mark.parametrize("norm", NORMS)
def test_galore_adamw_communicates_within_adamws_bound_except_when_it_renews_its_projections(sharded_runs, norm):
    """GaLore AdamW on rows: a regular step sums ``r * n`` numbers per wide matrix; a step that renews the projections
    (every ``update_proj_gap`` = 2 steps here: steps 0 and 2) sums each matrix's row blocks to take its SVD."""
    ours = collectives(sharded_runs, _name("galore_adamw", norm))
    adamw = collectives(sharded_runs, _name("adamw_torch", norm))
    for step in (1, 3):
        assert sum(ours[step]["calls"].values()) <= sum(adamw[step]["calls"].values()) + 2 * FSDP_GROUPS
        assert sum(ours[step]["bytes"].values()) <= 1.05 * sum(adamw[step]["bytes"].values())
    for step in (0, 2):  # (the renewal: the matrices' row blocks summed, 1.32x here)
        assert sum(ours[step]["bytes"].values()) < 1.5 * sum(adamw[step]["bytes"].values())


@pytest.mark.parametrize(("optim", "norm"), NO_GATHER)
def test_no_gather_beyond_fsdp2s_own(sharded_runs, optim, norm):
    """Every step all-gathers exactly the bytes FSDP2 AdamW's step does (the parameters, for forward and backward):
    a gathered parameter, gradient or optimizer state would add to them."""
    ours, adamw = collectives(sharded_runs, _name(optim, norm)), collectives(sharded_runs, _name("adamw_torch", norm))
    for step, (a, b) in enumerate(zip(ours, adamw)):
        assert a["bytes"]["all_gather"] == b["bytes"]["all_gather"], step


def test_the_counter_sees_a_gathered_step(sharded_runs):
    """The control: GaLore Adafactor still steps through GatheredStepOptimizer, whose gathers the counter must see."""
    ours = collectives(sharded_runs, _name("galore_adafactor", "0"))
    adamw = collectives(sharded_runs, _name("adamw_torch", "0"))
    assert all(a["bytes"]["all_gather"] > 1.5 * b["bytes"]["all_gather"] for a, b in zip(ours, adamw))
