"""CUDA-only checks: ``python -m pytest -m gpu tests/gpu -q`` on a machine with a CUDA device (skipped elsewhere).

fused AdamW on CUDA against transformers' Trainer, LOMO/AdaLomo under bf16-mixed on CUDA (state on the device),
the GradScaler refusal, FSDP with an elementwise optimizer and its refusal of APOLLO, schedule-free resume on CUDA,
and the FSDP2 (ModelParallelStrategy) fits of tests/test_sharded.py on CUDA with NCCL, one process per device.
"""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import TrainingArguments

from lightning_optims import OptimizerArguments
from tests.helpers import LlamaModule, TokenDataset, lightning_trainer, loader, tiny_llama
from tests.test_parity_transformers import _SequentialTrainer

pytestmark = pytest.mark.gpu


def cuda_trainer(max_steps: int, **kwargs) -> L.Trainer:
    return lightning_trainer(max_steps, **{"accelerator": "cuda", **kwargs})


def test_fused_adamw_on_cuda_matches_trainer(tmp_path):
    ta = TrainingArguments(
        output_dir=str(tmp_path),
        optim="adamw_torch_fused",
        learning_rate=1e-3,
        max_steps=6,
        per_device_train_batch_size=4,
        warmup_steps=2,
        weight_decay=0.05,
        report_to=[],
        save_strategy="no",
    )
    hf = tiny_llama()
    _SequentialTrainer(model=hf, args=ta, train_dataset=TokenDataset()).train()
    module = LlamaModule(model=tiny_llama(), **OptimizerArguments.from_training_arguments(ta).as_kwargs())
    cuda_trainer(6).fit(module, loader(4))
    assert module.trainer.optimizers[0].defaults["fused"] is True
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[key].cpu(), value.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_in_backward_bf16_on_cuda(name):
    module = LlamaModule(model=tiny_llama(), optim=name, learning_rate=1e-2, max_grad_norm=1.0)
    cuda_trainer(4, precision="bf16-mixed").fit(module, loader())
    opt = module.trainer.optimizers[0]
    assert all(t.device.type == "cuda" for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_in_backward_refuses_grad_scaler():
    module = LlamaModule(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    with pytest.raises(MisconfigurationException, match="GradScaler"):
        cuda_trainer(2, precision="16-mixed").fit(module, loader())


def test_fsdp_elementwise_runs_and_whole_tensor_is_refused():
    module = LlamaModule(model=tiny_llama(), optim="adamw_torch")
    cuda_trainer(3, strategy="fsdp").fit(module, loader())
    refused = LlamaModule(model=tiny_llama(), optim="apollo_adamw", optim_target_modules="all-linear")
    with pytest.raises(MisconfigurationException, match="not supported under FSDPStrategy"):
        cuda_trainer(3, strategy="fsdp").fit(refused, loader())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_refuses_lomo():
    module = LlamaModule(model=tiny_llama(), optim="lomo", max_grad_norm=0.0)
    with pytest.raises(MisconfigurationException, match="DeepSpeedStrategy"):
        cuda_trainer(2, strategy="deepspeed_stage_2").fit(module, loader())


def test_schedule_free_resume_on_cuda(tmp_path):
    def run(ckpt_path=None):
        module = LlamaModule(
            model=tiny_llama(), optim="schedule_free_adamw", lr_scheduler_type="constant", learning_rate=1e-2
        )
        cuda_trainer(
            -1,
            max_epochs=3,
            enable_checkpointing=True,
            default_root_dir=str(tmp_path),
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")],
        ).fit(module, loader(n=16), ckpt_path=ckpt_path)
        return module

    full = run()
    resumed = run(str(tmp_path / "epoch=0.ckpt"))
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def _sharded_llama(tmp_path, sharded_runs: list[str], single_runs: list[str]) -> None:
    """tests/scripts/sharded_llama_fit.py over every CUDA device here (NCCL; with one device FSDP2 still shards over a
    1-process mesh, so the DTensor code paths run), and on one device without sharding."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "tests" / "scripts" / "sharded_llama_fit.py"
    processes = min(torch.cuda.device_count(), 2)
    env = {**os.environ, "SHARDED_TEST_ACCELERATOR": "cuda", "SHARDED_TEST_PROCESSES": str(processes)}
    for mode, these in (("sharded", sharded_runs), ("single", single_runs)):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), mode, *these],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize(
    ("optim", "norm"),
    [
        ("lomo", "1.0"),
        ("adalomo", "1.0"),
        ("apollo_mini", "1.0"),
        ("apollo_adamw", "1.0"),
        ("adafactor", "1.0"),
        ("grokadamw", "1.0"),
        ("apollo_adamw_layerwise", "0"),
        ("galore_adamw", "1.0"),  # (a projection renewal: the blocks to their owner by NCCL's all_to_all_single)
    ],
)
def test_fsdp2_on_cuda_nccl_equals_one_device(tmp_path, optim, norm):
    """ModelParallelStrategy on CUDA against one device without sharding, and an epoch-boundary resume."""
    _sharded_llama(
        tmp_path, [f"full:{optim}:{norm}:ckpt", f"resumed:{optim}:{norm}:resume=full"], [f"single:{optim}:{norm}"]
    )
    full, resumed, single = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("full", "resumed", "single"))
    for key in single:
        torch.testing.assert_close(full[key], single[key], atol=1e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(resumed[key], full[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("optim", ["adamw_torch", "lomo"])
def test_fsdp2_on_cuda_nccl_parameter_unused_on_some_processes(tmp_path, optim):
    """set_reduce_scatter_unused_params(True) with this package's rule, on NCCL (device tensors for the flags)."""
    _sharded_llama(tmp_path, [f"full:{optim}:1.0:unused"], [f"single:{optim}:1.0:unused"])
    full, single = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("full", "single"))
    for key in single:
        torch.testing.assert_close(full[key], single[key], atol=1e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
