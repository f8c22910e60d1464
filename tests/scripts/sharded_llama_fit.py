"""Run by tests/test_sharded.py (Lightning's launcher re-executes this script for the second process):

    python tests/scripts/sharded_llama_fit.py OUT_DIR {sharded,single} RUN [RUN ...]

Each RUN is ``NAME:OPTIM:MAX_GRAD_NORM[:OPTION]`` and fits the tiny Llama of the tests for 4 steps (2 epochs of 2):
under ``ModelParallelStrategy`` on 2 CPU processes (gloo) with every decoder layer and the model ``fully_shard``-ed
(FSDP2, DTensor parameters sharded on dim 0), each process taking half of every batch, or on one process with the
combined batches. The full weights go to ``OUT_DIR/NAME.pt``. OPTION: ``ckpt`` saves a checkpoint at each epoch end
(in ``OUT_DIR/NAME-ckpt``) and the full state at the end of epoch 0 (``NAME.epoch0-state.pt``); ``resume=OTHER``
resumes from run OTHER's epoch-0 checkpoint and saves the full state it restored (``NAME.loaded-state.pt``);
``local`` is the control with the statistics left shard-local (in-backward: no collective; the block steps: the
optimizer on this process's part); ``unused`` fits a model whose head ``aux`` is used by sample 0 only (step 0 of
each epoch: one process uses it, the other not; step 1: no process), with FSDP2's
``set_reduce_scatter_unused_params(True)``;
``unused-torch`` is its control, with that switch alone (torch's zeros for every unused parameter, without this
package's rule); ``nan-grad`` / ``nan-loss``: at global step 1 the last process's gradient (its loss finite) / its
loss is non-finite, the others' not: each process writes what stopped it to ``NAME.failed.rankR`` (the error, the
step, whether its part of the weights is finite and as before that step) and the launch goes on; ``gathered`` (the
control of the collective counter) all-gathers the whole gradient of each matrix that takes a block step.
``SHARDED_TEST_LAYOUT=hsdp`` shards on a replicate x shard mesh instead (HSDP), but for the runs with OPTION ``flat``
(FSDP2 on the 1-D mesh of every process, in the same launch); ``ddp`` runs DDP (nothing sharded:
the non-finite cases under plain data parallelism). Every fit writes the digest of each process's full weights to
``NAME.digests``, and the shapes of the matrices whose SVD each process took to ``NAME.svds.rankR`` (JSON), those of
its Newton-Schulz iterations (Muon) to ``NAME.ns.rankR``, both calls' inputs and results to ``NAME.taken.rankR.pt``,
which the reference replays with ``SHARDED_TEST_REPLAY`` (``Replay``). All runs
of a launch share its processes (one launch, many fits, as Lightning allows), in the order given.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import default_data_collator

from lightning_optims.distributed.placements import local, local_indices
from tests.collectives import CollectiveCounter
from tests.helpers import (
    FlaggedTokenDataset,
    LlamaModule,
    RankInterleavedSampler,
    TokenDataset,
    leave_process_group,
    tiny_llama,
)

STEPS_PER_EPOCH, EPOCHS, BATCH = 2, 2, 4  # BATCH: the combined batch of a step, split over the processes
# tests/gpu runs the same fits on CUDA (NCCL) with as many processes as there are devices; tests/test_sharded.py
# also runs them on 1 FSDP2 process (resuming a checkpoint saved by 2, and saving one that 2 resume)
ACCELERATOR = os.environ.get("SHARDED_TEST_ACCELERATOR", "cpu")
# a collective that waits longer fails the launch (processes that disagree on a verdict would otherwise wait for gloo's
# 30 minutes): the tests report the first error instead of hanging
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
PROCESSES = int(os.environ.get("SHARDED_TEST_PROCESSES", "2"))
# fsdp2: fully_shard on the 1-D data-parallel mesh; hsdp: on a replicate x shard mesh of PROCESSES // 2 x 2 (the
# replicate dimension first, as torch's init_device_mesh lays out nodes x GPUs per node); tp: tensor parallelism on
# PROCESSES processes (ColwiseParallel on q/k/v/gate/up, RowwiseParallel on o/down; embeddings, norms and head plain
# tensors, the same on every process); 2d: tensor parallelism over 2 processes and fully_shard over PROCESSES // 2
LAYOUT = os.environ.get("SHARDED_TEST_LAYOUT", "fsdp2")
TENSOR_PARALLEL = {"tp": PROCESSES, "2d": 2}.get(LAYOUT, 1)
DATA_PARALLEL = PROCESSES // TENSOR_PARALLEL
PLAN = {
    **{f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")},
    "self_attn.o_proj": RowwiseParallel(),
    **{f"mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")},
    "mlp.down_proj": RowwiseParallel(),
}
MINI = "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=2"
LOSS_SCALE = float(os.environ.get("SHARDED_TEST_LOSS_SCALE", "1"))
# the reference of a run (OUT/NAME) replays its SVDs and Newton-Schulz iterations (Replay)
REPLAY = os.environ.get("SHARDED_TEST_REPLAY", "")
SVD = "proj=svd,rank=2,update_proj_gap=2"  # APOLLO with GaLore's projections (the SVD of the gradient)


def optimizer_settings(optim: str, max_grad_norm: float) -> dict:
    """The test settings of ``optim`` (low-rank: all-linear targets, rank 2, projections renewed every 2 steps),
    with weight decay where the optimizer takes it; ``apollo_mini`` is APOLLO with tensor-wise scaling, rank 1,
    ``apollo_svd`` APOLLO with ``proj=svd``; ``OPTIM+KEY=VALUE[+...]`` sets these in its ``optim_args`` (a low-rank
    one's: ``galore_adamw+proj_type=reverse_std``); GrokAdamW clips each gradient at 0.01."""

    optim, *extra = optim.split("+")
    chosen = _base_settings(optim, max_grad_norm)
    if extra:
        pairs = dict(item.split("=", 1) for item in chosen["optim_args"].split(","))
        pairs.update(item.split("=", 1) for item in extra)
        chosen["optim_args"] = ",".join(f"{key}={value}" for key, value in pairs.items())
    return chosen


def _base_settings(optim: str, max_grad_norm: float) -> dict:
    from lightning_optims import get_spec
    from tests.test_reliability import settings

    if optim == "apollo_mini":
        chosen = settings("apollo_adamw", optim_args=MINI)
    elif optim == "apollo_svd":
        chosen = settings("apollo_adamw", optim_args=SVD)
    else:
        chosen = settings(optim)
    chosen.update(learning_rate=1e-2, max_grad_norm=max_grad_norm)
    spec = get_spec(chosen["optim"])
    if spec.updates_in_backward and not spec.layerwise:  # (LOMO / AdaLomo take it in optim_args)
        chosen["optim_args"] = "weight_decay=0.01"
    elif "weight_decay" in spec.uses:
        chosen["weight_decay"] = 0.01
    if optim == "grokadamw":  # its per-tensor clipping engaged (at 1.0, the default, it never is on this model)
        chosen["optim_args"] = "gradient_clipping=0.01"
    return chosen


def data_parallel_mesh(module: L.LightningModule):
    """The mesh ``fully_shard`` is given: Lightning's data-parallel mesh (FSDP2), or a replicate x shard mesh over
    the same processes (HSDP, but for a ``flat`` run)."""
    if LAYOUT == "hsdp" and not module.flat:
        return init_device_mesh(module.device.type, (PROCESSES // 2, 2), mesh_dim_names=("replicate", "shard"))
    return module.device_mesh["data_parallel"]


class DataParallelSampler(RankInterleavedSampler):
    """Data-parallel rank r of w takes samples r, r + w, ...: the processes of one tensor-parallel group (consecutive
    ranks, as ModelParallelStrategy's mesh lays them out) take the same samples."""

    def _rank_world(self) -> tuple[int, int]:
        rank, world = super()._rank_world()
        if world == 1:  # (the one-process reference)
            return 0, 1
        return rank // TENSOR_PARALLEL, world // TENSOR_PARALLEL


class ShardedLlama(LlamaModule):
    def __init__(self, shard: bool, **kwargs) -> None:
        super().__init__(model=tiny_llama(), **kwargs)
        self.shard = shard
        self.split = False  # (the micro reference of a tensor-parallel layout: its linear layers split)
        self.flat = False  # (in an HSDP launch: FSDP2 on the 1-D mesh of every process instead)

    def configure_model(self) -> None:
        if self.shard:
            parallelize(self, self.model.model.layers, self.model)
        elif self.split:
            split_like_tensor_parallel(self.model.model.layers)

    def training_step(self, batch, batch_idx):
        # SHARDED_TEST_LOSS_SCALE: every gradient rescaled by about 1e-7 relative (what the tests' tolerance of an
        # ill-conditioned optimizer measures its spread with); 1 leaves the loss as it is
        return super().training_step(batch, batch_idx) * LOSS_SCALE


class SplitLinear(torch.nn.Linear):
    """The arithmetic of a tensor-parallel linear layer on one process: the weight's ``parts`` blocks along ``dim``
    (0: ColwiseParallel's output features, each block's output concatenated, so the input's gradient is the sum of
    the blocks' parts, in order, as the parallel layer's all-reduce adds them; 1: RowwiseParallel's input features,
    the blocks' outputs added in order, as its all-reduce does). Still an ``nn.Linear`` with the same weight (what
    ``optim_target_modules="all-linear"`` selects)."""

    def __init__(self, linear: torch.nn.Linear, dim: int, parts: int) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.dim, self.parts = dim, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.chunk(self.parts, dim=self.dim)
        if self.dim == 0:
            return torch.cat([torch.nn.functional.linear(x, w) for w in blocks], dim=-1)
        inputs = x.chunk(self.parts, dim=-1)
        out = torch.nn.functional.linear(inputs[0], blocks[0])
        for x_part, w in zip(inputs[1:], blocks[1:]):
            out = out + torch.nn.functional.linear(x_part, w)
        return out


def split_like_tensor_parallel(layers) -> None:
    """The one-process reference of a tensor-parallel layout: each linear layer of ``PLAN`` computed as its
    ``TENSOR_PARALLEL`` parts are (``SplitLinear``); its weight stays the same parameter, under the same name."""
    for layer in layers:
        for name, style in PLAN.items():
            parent, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(parent)
            dim = 0 if isinstance(style, ColwiseParallel) else 1
            setattr(owner, leaf, SplitLinear(getattr(owner, leaf), dim, TENSOR_PARALLEL))


def parallelize(module: L.LightningModule, layers, model) -> None:
    """The layout ``LAYOUT`` of the decoder ``layers`` and the ``model``, as a user's ``configure_model`` builds it."""
    if LAYOUT == "ddp":  # (DDP wraps the module itself)
        return
    if TENSOR_PARALLEL > 1:
        for layer in layers:
            parallelize_module(layer, module.device_mesh["tensor_parallel"], PLAN)
    if LAYOUT == "tp":
        return
    mesh = data_parallel_mesh(module)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


class AuxNet(torch.nn.Module):
    """The tiny Llama and a head used only for flagged samples, in one module: FSDP2 shards the head with the
    embeddings and lm_head (the root group), whose forward runs on every process (a mixture-of-experts layer whose
    experts are routed some tokens or none). The head's loss term is a sum over samples divided by the batch size, so
    the processes' averaged gradients equal one process's on the combined batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()
        torch.manual_seed(3)
        self.aux = torch.nn.Linear(16, 4)

    def forward(self, aux: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        out = self.model(**batch, output_hidden_states=True)
        loss = out.loss
        mask = aux > 0
        if bool(mask.any()):
            loss = loss + self.aux(out.hidden_states[-1][mask].mean(dim=1)).pow(2).sum() / len(aux)
        return loss


class ShardedAuxLlama(ShardedLlama):
    def __init__(self, shard: bool, **kwargs) -> None:
        super().__init__(shard, **kwargs)
        self.model = AuxNet()

    def configure_model(self) -> None:
        if self.shard:
            parallelize(self, self.model.model.model.layers, self.model)
            if os.environ.get("SHARDED_TEST_UNUSED_SWITCH", "1") == "1":  # (off by default; torch >= 2.13 has it)
                self.model.set_reduce_scatter_unused_params(True)

    def training_step(self, batch, batch_idx):
        return self.model(**batch)


class NonFiniteOnLastProcess(ShardedLlama):
    """At global step 1 the last process's loss (``nan-loss``) or, its loss finite, its gradient (``nan-grad``: a hook
    on the loss multiplies the gradient flowing back from it by NaN) is non-finite; the other processes' are not.
    ``nan-rows``: one element of the last process's unreduced gradient of :meth:`target`'s first row is inf (an
    overflow in one row): after FSDP2's reduce-scatter only the process that holds that row has a non-finite
    gradient, in that parameter alone."""

    def __init__(self, shard: bool, what: str, **kwargs) -> None:
        super().__init__(shard, **kwargs)
        self.what = what

    def target(self) -> torch.nn.Module:
        return self.model.model.layers[0].mlp.up_proj

    def training_step(self, batch, batch_idx):
        last = self.trainer.global_rank == self.trainer.world_size - 1
        if self.what == "nan-rows" and self.global_step == 1 and last:

            def overflow(module, args):  # (FSDP2's pre-forward has put the unsharded weight in place)
                handle.remove()
                module.weight.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("inf")))

            handle = self.target().register_forward_pre_hook(overflow)
        if self.what == "nan-rows":
            return super().training_step(batch, batch_idx)
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 1 and self.trainer.global_rank == self.trainer.world_size - 1:
            if self.what == "nan-loss":
                return loss * float("nan")
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss


class RecordFailure(Callback):
    """What stopped this process, at which step, and whether its part of the weights is finite and as it was before
    the step (``NAME.failed.rankR``, JSON); no collective (a process that stopped alone must not wait here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before: list[torch.Tensor] = []

    @staticmethod
    def _parts(trainer) -> list[torch.Tensor]:  # (the optimizer's: FSDP2 swaps the module's own during a step)
        return [local(p).detach() for group in trainer.optimizers[0].param_groups for p in group["params"]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.clone() for p in self._parts(trainer)]
        params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        target = pl_module.target().weight if hasattr(pl_module, "target") else None
        self.target = next((i for i, p in enumerate(params) if p is target), None)

    def on_exception(self, trainer, pl_module, exception):
        now = self._parts(trainer)
        record = {
            "error": type(exception).__name__,
            "message": str(exception),
            "step": trainer.global_step,
            "finite": all(bool(torch.isfinite(p).all()) for p in now),
            "unchanged": all(torch.equal(a, b) for a, b in zip(self.before, now)),
            "target_unchanged": None
            if self.target is None
            else torch.equal(self.before[self.target], now[self.target]),
        }
        self.path.with_suffix(f".failed.rank{trainer.global_rank}").write_text(json.dumps(record))


class CountCollectives(Callback):
    """The collectives this process issues in each training step (forward, backward, optimizer step), written as
    ``NAME.collectives`` (JSON: one ``{"calls": ..., "bytes": ...}`` per step) by the first process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: list[dict] = []
        self.counter: CollectiveCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = CollectiveCounter()
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.steps.append(self.counter.snapshot())
            self.counter = None

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.with_suffix(".collectives").write_text(json.dumps(self.steps))


class SaveFullState(Callback):
    """The full weights and optimizer state, by parameter name (``weight:NAME``, ``state:NAME:KEY``; each
    ``DTensor`` gathered whole), to ``path``: at the end of epoch 0 (what the checkpoint of that epoch holds), or
    when training starts (``loaded``: what a resumed run restored from a checkpoint)."""

    def __init__(self, path: Path, loaded: bool) -> None:
        self.path, self.loaded = path, loaded

    def on_train_start(self, trainer, pl_module):
        if self.loaded:
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.loaded and trainer.current_epoch == 0:
            self._save(trainer, pl_module)

    def _save(self, trainer, pl_module) -> None:
        def whole(value):
            return (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()

        named = dict(pl_module.model.named_parameters())
        names = {p: n for n, p in named.items()}
        state = {f"weight:{n}": whole(p) for n, p in sorted(named.items())}
        optimizer = trainer.optimizers[0]
        for p, entry in sorted(optimizer.state.items(), key=lambda item: names[item[0]]):
            for key in sorted(entry, key=str):
                value = entry[key]
                if isinstance(value, torch.Tensor):
                    state[f"state:{names[p]}:{key}"] = whole(value)
                elif isinstance(value, (int, float, bool)):
                    state[f"state:{names[p]}:{key}"] = torch.tensor(value)
        if trainer.is_global_zero:
            torch.save(state, self.path)


class SaveFullWeights(Callback):
    """The full weights at the end, the steps this fit took (``NAME.steps``: a resumed fit takes fewer) and the
    ``grad_norm`` logged at each optimizer step (``NAME.norms``, JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps = 0
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.norms.append(float(pl_module.last_grad_norm))

    def on_fit_end(self, trainer, pl_module):
        full = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().float()
            for k, v in pl_module.model.state_dict().items()
        }
        # every process's full weights (HSDP's replicas step on their own): the same bits on every process
        digest = hashlib.sha256(b"".join(full[k].numpy().tobytes() for k in sorted(full))).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8)
        gathered = [mine]
        if torch.distributed.is_initialized():
            gathered = [torch.empty_like(mine) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(gathered, mine)
        digests = [bytes(t.tolist()).hex() for t in gathered]
        if trainer.is_global_zero:
            self.path.with_suffix(".digests").write_text(json.dumps(digests))
            torch.save(full, self.path)
            self.path.with_suffix(".steps").write_text(str(self.steps))
            self.path.with_suffix(".norms").write_text(json.dumps(self.norms))


def shard_local_step(self, p, group) -> None:
    """The control of ShardedStepOptimizer: the upstream optimizer on this process's part alone (its statistics,
    norms, factorisations and projections then see half of each tensor)."""
    steppers = self.__dict__.setdefault("_local_steppers", {})
    if p not in steppers:
        rows = torch.nn.Parameter(local(p).detach().clone())
        options = {k: v for k, v in group.items() if k != "params"}
        steppers[p] = (rows, self._optimizer_cls([{"params": [rows], **options}], **self._kwargs))
    rows, inner = steppers[p]
    inner.param_groups[0]["lr"] = group["lr"]
    rows.data.copy_(local(p))
    rows.grad = local(p.grad).clone()
    inner.step()
    local(p).copy_(rows.detach())


def alone(part) -> torch.Tensor:
    """The control's renewal: a ``ToOwner`` part's whole matrix with this process's block in place and zeros
    elsewhere (what this process would take the SVD of with no other process's block)."""
    whole = part.tensor.new_zeros(part.param.shape)
    whole[local_indices(part.param, 0).unsqueeze(1), local_indices(part.param, 1)] = part.tensor
    return whole


class Replay:
    """The one-process reference of a run whose whole-matrix results it replays (``SHARDED_TEST_REPLAY``: that run's
    ``OUT/NAME``): each SVD, and each Newton-Schulz iteration (Muon), this process would take returns instead the one
    a process of that run took of the nearest matrix of the same shape (its ``NAME.taken.rankR.pt``), and notes the
    distance between the two matrices (the Frobenius norm of the difference over the recorded matrix's, the
    reference's matrix in the recorded one's dtype). Both amplify a difference of rounding in their input (the
    layouts add the gradients in another order): an SVD whose singular values lie close turns it into one of its
    singular vectors, and Muon's bfloat16 rounds a float32 value that moved by one unit to the next bfloat16 (2**16
    float32 units) at times. With the same results, the reference and the run differ by their rounding alone,
    whatever the machine's kernels."""

    def __init__(self, run: Path) -> None:
        self.records: dict[str, list[dict]] = {}
        for path in sorted(run.parent.glob(f"{run.name}.taken.rank*.pt")):
            for kind, records in torch.load(path, weights_only=True).items():
                self.records.setdefault(kind, []).extend(records)
        self.distances: dict[str, list[float]] = {kind: [] for kind in WHOLE_MATRIX}

    def result(self, kind: str, matrix: torch.Tensor):
        same = [r for r in self.records.get(kind, []) if r["input"].shape == matrix.shape]
        assert same, f"no {kind} of a {tuple(matrix.shape)} matrix was recorded"
        mine = matrix.detach().cpu().to(same[0]["input"].dtype).float()
        gaps = [float((r["input"].float() - mine).norm() / r["input"].float().norm()) for r in same]
        nearest = min(range(len(same)), key=gaps.__getitem__)
        self.distances[kind].append(gaps[nearest])
        return [t.to(matrix.device) for t in same[nearest]["output"]]


#: the whole-matrix functions a sharded run records and its reference may replay, and the file of the shapes each
#: process took them of (NAME.SUFFIX.rankR)
WHOLE_MATRIX = {"svd": "svds", "newton_schulz": "ns"}


def recording(out: Path, name: str, sharded: bool, rank: Callable[[], int]):
    """Wrap the functions of :data:`WHOLE_MATRIX` for one fit: each call's shape noted, its input and result kept
    (a sharded run), or its result replayed (a reference with ``SHARDED_TEST_REPLAY``). Returns the function that
    undoes it and writes the files."""
    from lightning_optims.families import muon

    homes = {"svd": torch.linalg, "newton_schulz": muon}
    replay = Replay(Path(REPLAY)) if REPLAY and not sharded else None
    shapes: dict[str, list] = {kind: [] for kind in WHOLE_MATRIX}
    taken: dict[str, list] = {kind: [] for kind in WHOLE_MATRIX}
    originals = {kind: getattr(homes[kind], kind) for kind in WHOLE_MATRIX}

    def wrapped(kind: str):
        def call(matrix, *args, **kwargs):
            shapes[kind].append(list(matrix.shape))
            if replay is not None:
                result = replay.result(kind, matrix)
                return torch.return_types.linalg_svd(result) if kind == "svd" else result[0]
            result = originals[kind](matrix, *args, **kwargs)
            outputs = list(result) if kind == "svd" else [result]
            taken[kind].append(
                {"input": matrix.detach().cpu().clone(), "output": [t.detach().cpu().clone() for t in outputs]}
            )
            return result

        return call

    for kind in WHOLE_MATRIX:
        setattr(homes[kind], kind, wrapped(kind))

    def undo() -> None:
        for kind, suffix in WHOLE_MATRIX.items():
            setattr(homes[kind], kind, originals[kind])
            (out / f"{name}.{suffix}.rank{rank()}").write_text(json.dumps(shapes[kind]))
        if any(taken.values()):
            torch.save(taken, out / f"{name}.taken.rank{rank()}.pt")
        if replay is not None:
            (out / f"{name}.replayed").write_text(json.dumps(replay.distances))

    return undo


def my_block(part) -> torch.Tensor:
    """The control's way back: this process's block of a ``FromOwner`` part's matrix, which it computed itself
    (``alone``: from its own block only)."""
    block = part.tensor[local_indices(part.param, 0).unsqueeze(1), local_indices(part.param, 1)]
    return block.to(part.dtype)


def fit(out: Path, sharded: bool, name: str, optim: str, max_grad_norm: str, option: str = "") -> None:
    from lightning_optims import get_spec, mixin
    from lightning_optims.distributed.owners import FromOwner, ToOwner
    from lightning_optims.distributed.sums import Along, ShardSums
    from lightning_optims.engines.sharded import ShardedStepOptimizer
    from lightning_optims.errors import NonFiniteGradientError, NonFiniteLossError

    sync_unused = mixin.sync_unused_parameters
    step_param, shard_sums = ShardedStepOptimizer._step, ShardSums.sums
    sharding = get_spec(optimizer_settings(optim, 0.0)["optim"]).sharding
    part_step_cls = type(sharding.part_step) if sharding is not None and sharding.part_step is not None else None
    part_step = part_step_cls.step if part_step_cls is not None else None
    if option == "local":  # the control: each process uses its shard's statistics only
        ShardedStepOptimizer._step = shard_local_step
        ShardSums.sums = lambda self, parts: [
            p.tensor
            if isinstance(p, Along)
            else alone(p)
            if isinstance(p, ToOwner)
            else my_block(p)
            if isinstance(p, FromOwner)
            else p
            for p in parts
        ]
    if option == "gathered":  # the control of the collective counter: each family's step gathers its gradient first

        def gathered(self, parts, p, group):
            p.grad.full_tensor()  # (an all-gather of the whole gradient, its result unused)
            return (yield from part_step(self, parts, p, group))

        part_step_cls.step = gathered
    if option == "unused-torch":  # the control: FSDP2's own zeros for every unused parameter
        mixin.sync_unused_parameters = lambda module: 0
    chosen = optimizer_settings(optim, float(max_grad_norm))
    if option.startswith("nan-"):
        module: ShardedLlama = NonFiniteOnLastProcess(sharded, option, **chosen)
    else:
        module = (ShardedAuxLlama if option.startswith("unused") else ShardedLlama)(sharded, **chosen)
    callbacks: list = [SaveFullWeights(out / f"{name}.pt")]
    if option.startswith("nan-"):
        callbacks.append(RecordFailure(out / f"{name}.pt"))
    if sharded:
        callbacks.insert(0, CountCollectives(out / f"{name}.pt"))
    if option == "ckpt":
        callbacks.append(ModelCheckpoint(dirpath=out / f"{name}-ckpt", save_top_k=-1, filename="{epoch}"))
    if option == "ckpt" or option.startswith("resume="):
        loaded = option.startswith("resume=")
        callbacks.append(SaveFullState(out / f"{name}.{'loaded' if loaded else 'epoch0'}-state.pt", loaded))
    resume = out / f"{option[len('resume=') :]}-ckpt" / "epoch=0.ckpt" if option.startswith("resume=") else None
    # micro: one process on the combined batch of each step, its gradient accumulated over the processes' halves in
    # their order, as FSDP2 sums them (the same arithmetic: a whole batch in one matmul rounds otherwise)
    micro = not sharded and option == "micro"
    module.split = not sharded and TENSOR_PARALLEL > 1  # (the reference of a tensor-parallel layout)
    module.flat = option == "flat"
    trainer = L.Trainer(
        accelerator=ACCELERATOR,
        accumulate_grad_batches=DATA_PARALLEL if micro else 1,
        devices=PROCESSES if sharded else 1,
        strategy=(
            DDPStrategy(timeout=COLLECTIVE_TIMEOUT)
            if LAYOUT == "ddp"
            else ModelParallelStrategy(
                data_parallel_size=DATA_PARALLEL, tensor_parallel_size=TENSOR_PARALLEL, timeout=COLLECTIVE_TIMEOUT
            )
        )
        if sharded
        else "auto",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=option == "ckpt",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=out,
    )
    per_process, n = BATCH // DATA_PARALLEL if sharded else BATCH, BATCH * STEPS_PER_EPOCH
    data = torch.utils.data.DataLoader(
        TokenDataset(n), batch_size=per_process, sampler=DataParallelSampler(n), collate_fn=default_data_collator
    )
    if micro:  # step s: each data-parallel rank's part of it, as DataParallelSampler deals them (rank 0's first)
        part = BATCH // DATA_PARALLEL
        parts = [
            list(range(r, n, DATA_PARALLEL))[s * part : (s + 1) * part]
            for s in range(STEPS_PER_EPOCH)
            for r in range(DATA_PARALLEL)
        ]
        data = torch.utils.data.DataLoader(TokenDataset(n), batch_sampler=parts, collate_fn=default_data_collator)
    if option.startswith("unused"):
        data = torch.utils.data.DataLoader(
            FlaggedTokenDataset(n, flagged=(0,)),
            batch_size=per_process,
            sampler=DataParallelSampler(n),
            collate_fn=default_data_collator,
        )
    undo_recording = recording(out, name, sharded, lambda: trainer.global_rank)
    try:
        trainer.fit(module, data, ckpt_path=resume)
    except (NonFiniteGradientError, NonFiniteLossError):
        if not option.startswith("nan-"):
            raise
    finally:
        undo_recording()
        mixin.sync_unused_parameters = sync_unused
        ShardedStepOptimizer._step, ShardSums.sums = step_param, shard_sums
        if part_step_cls is not None:
            part_step_cls.step = part_step


def main(out: str, mode: str, *runs: str) -> None:
    for run in runs:
        fit(Path(out), mode == "sharded", *run.split(":"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()
