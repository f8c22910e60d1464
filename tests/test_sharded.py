"""Sharded training (ModelParallelStrategy, FSDP2) of the in-backward optimizers: two CPU processes (gloo) whose
tiny Llama has every decoder layer and the model ``fully_shard``-ed end with the full weights of one process on the
combined batches. LOMO's global norm and AdaLomo's row / column statistics and RMS are completed over the shards;
with shard-local statistics these tests fail (see test_shard_local_statistics_would_differ)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_llama_fit.py"
CASES = [("lomo", "1.0"), ("lomo", "0"), ("adalomo", "1.0"), ("adalomo", "0")]


def run(optim: str, max_grad_norm: str, out: Path, mode: str, *extra: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), optim, max_grad_norm, str(out), mode, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "max_grad_norm"), CASES)
def test_fsdp2_two_processes_equal_one_process(tmp_path, optim, max_grad_norm):
    run(optim, max_grad_norm, tmp_path / "sharded.pt", "sharded")
    run(optim, max_grad_norm, tmp_path / "single.pt", "single")
    sharded, single = full_weights(tmp_path / "sharded.pt"), full_weights(tmp_path / "single.pt")
    initial = tiny_llama().state_dict()
    assert sharded.keys() == single.keys() == initial.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")
        assert not torch.equal(single[key], initial[key]) or "rotary" in key, f"{key} was not trained"


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_fsdp2_resume_from_epoch_boundary_equals_uninterrupted(tmp_path, optim):
    """Lightning's distributed checkpoint of the sharded module and optimizer (AdaLomo's row statistics are per
    shard, its column statistics whole), resumed by two fresh processes."""
    run(optim, "1.0", tmp_path / "full.pt", "sharded", str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert checkpoint.exists()
    run(optim, "1.0", tmp_path / "resumed.pt", "sharded", str(tmp_path / "ckpt2"), str(checkpoint))
    full, resumed = full_weights(tmp_path / "full.pt"), full_weights(tmp_path / "resumed.pt")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize(("optim", "max_grad_norm"), [("lomo", "1.0"), ("adalomo", "0")])
def test_shard_local_statistics_would_differ(tmp_path, optim, max_grad_norm):
    """The control: the same run with each process's statistics left shard-local (LOMO's clipping norm, AdaLomo's
    column means and RMS) ends measurably away from one process, so the equality tests above can fail."""
    run(optim, max_grad_norm, tmp_path / "local.pt", "sharded_local_stats")
    run(optim, max_grad_norm, tmp_path / "single.pt", "single")
    local, single = full_weights(tmp_path / "local.pt"), full_weights(tmp_path / "single.pt")
    worst = max(float((local[k] - single[k]).abs().max()) for k in single)
    assert worst > 1e-4
