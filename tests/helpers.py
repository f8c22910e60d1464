"""Tiny models and data shared by the tests (module level, so ddp_spawn can pickle them)."""

from __future__ import annotations

import copy
import inspect
import os
import re
import sys
from typing import NoReturn

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from lightning_optims import OptimizerMixin, compat

VOCAB = 64
SEQ = 8


def tiny_llama(seed: int = 0, layers: int = 2, bias: bool = False) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights built from a config (no download); ``bias``: its linear layers have
    biases (Llama's have none)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = LlamaForCausalLM(config)
    model.train()
    return model


class TokenDataset(Dataset):
    """Random token sequences; labels are the inputs (the model shifts them)."""

    def __init__(self, n: int = 32, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def loader(batch_size: int = 4, n: int = 32, seed: int = 1) -> DataLoader:
    return DataLoader(TokenDataset(n, seed), batch_size=batch_size, shuffle=False, collate_fn=default_data_collator)


class RankInterleavedSampler(torch.utils.data.Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, ... in order (decided when iterated, i.e. inside the rank),
    so that the ranks' batches of one step together are one process's batch of that step."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def ddp_loader(batch_size: int, n: int = 32, seed: int = 1) -> DataLoader:
    """For DDP comparisons: pair with Trainer(use_distributed_sampler=False)."""
    return DataLoader(
        TokenDataset(n, seed),
        batch_size=batch_size,
        sampler=RankInterleavedSampler(n),
        collate_fn=default_data_collator,
    )


class LlamaModule(OptimizerMixin, L.LightningModule):
    """A user's module: the training_step returns the loss and nothing else."""

    def __init__(self, model: torch.nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model if model is not None else tiny_llama()

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val_loss", loss)
        return loss


class NanGradient(LlamaModule):
    """A finite loss whose gradient is NaN at batch ``poison_batch`` (d/dw [0 * sqrt(0 * w)] = 0 * inf)."""

    poison_batch = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.poison_batch:
            loss = loss + 0.0 * torch.sqrt(0.0 * self.model.lm_head.weight[0, 0])
        return loss


class FlaggedTokenDataset(TokenDataset):
    """Token sequences with an ``aux`` flag: 1.0 for the samples in ``flagged``, else 0.0."""

    def __init__(self, n: int = 32, seed: int = 1, flagged: tuple[int, ...] = (0, 5)) -> None:
        super().__init__(n, seed)
        self.flagged = set(flagged)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "aux": torch.tensor(1.0 if i in self.flagged else 0.0)}


class AuxHeadLlama(LlamaModule):
    """A head used only for flagged samples: in a step where a process has none, it gets no gradient there (a
    mixture-of-experts route, a conditional branch). Its loss term is a sum over samples divided by the batch size,
    so two processes' averaged gradients equal one process's on the combined batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(3)
        self.aux = torch.nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        flags = batch.pop("aux")
        out = self.model(**batch, output_hidden_states=True)
        loss = out.loss
        mask = flags > 0
        if bool(mask.any()):
            hidden = out.hidden_states[-1][mask].mean(dim=1)
            loss = loss + self.aux(hidden).pow(2).sum() / len(flags)
        return loss


def flagged_ddp_loader(batch_size: int, n: int = 16) -> DataLoader:
    return DataLoader(
        FlaggedTokenDataset(n),
        batch_size=batch_size,
        sampler=RankInterleavedSampler(n),
        collate_fn=default_data_collator,
    )


def assert_unavailable_for_its_reason(name: str, reason: str) -> None:
    """``reason`` (why ``name`` is not usable here) is true, checked without the registry's own check: a package it
    names does not import, or it needs CUDA and none is available."""
    import importlib

    from lightning_optims import get_spec

    spec = get_spec(name)
    assert name in reason, reason
    for package in spec.packages:
        try:
            importlib.import_module(package)
        except ImportError:
            assert repr(package) in reason and (spec.extra or "lightning_optims") in reason, reason
            return
    assert spec.device == "cuda" and not torch.cuda.is_available() and "CUDA" in reason, reason


def lightning_trainer(max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def leave_process_group() -> NoReturn:
    """End a launched script's process once its work is done: wait for every process to be done, then leave without
    the interpreter's finalization (``os._exit(0)``, after flushing the output). Gloo's threads can abort the process
    during finalization, after every result is written (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#179291, #190489): seen once in a tensor-parallel test before the groups were destroyed here, and
    once since (``tests/test_strategies.py``, a fit whose weights were written) with them destroyed. Nothing a test
    reads is written at finalization, so the launch's exit status is that of its work alone."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every process has done its work (none is left in a collective), or the one missing is named within a
        # minute; the groups are not destroyed: on torch 2.6 destroy_process_group hung on a process whose peer had
        # already left (a DDP launch, CI at the floors), and os._exit ends gloo's threads with the process
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:  # (NCCL has no monitored barrier)
            dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def needs(feature: str) -> pytest.MarkDecorator:
    """Skip where the installed versions lack ``feature`` (a key of ``lightning_optims.compat.FEATURES``): the test
    exercises what that feature does; tests/test_versions.py checks its refusal there instead."""
    reason = compat.missing(feature)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


#: load_from_checkpoint(..., weights_only=True) where Lightning takes it (2.6); Lightning 2.5 has no such argument
WEIGHTS_ONLY: dict[str, bool] = (
    {"weights_only": True}
    if "weights_only" in inspect.signature(L.LightningModule.load_from_checkpoint).parameters
    else {}
)


_ERROR_LINE = re.compile(r"^(?:\[rank(\d+)\]:\s*)?[A-Za-z_][\w.]*(?:Error|Exception)\b(?::|$)")


def launch_failure(stderr: str, tail: int = 3000) -> str:
    """What a failed launch of several processes reports: the first error in its output (the traceback lines of the
    same process before it), which is the cause, before the end of the output, which often shows a peer's consequence
    ("Connection closed by peer", a collective's timeout)."""
    lines = stderr.splitlines()
    for at, line in enumerate(lines):
        found = _ERROR_LINE.match(line)
        if found is None:
            continue
        prefix = f"[rank{found.group(1)}]:" if found.group(1) else ""
        start = at
        while start > 0 and at - start < 40 and lines[start - 1].startswith(prefix) and lines[start - 1].strip():
            start -= 1
        block = "\n".join(lines[start : at + 1])
        return (
            f"first error (line {at + 1} of the output):\n{block}\n\n... the output's last {tail} characters:\n"
            + (stderr[-tail:])
        )
    return stderr[-tail:]
