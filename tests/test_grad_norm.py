"""What a Trainer user reads in the logs: ``grad_norm`` at every optimizer step (the global norm before clipping, also
with ``max_grad_norm=0``), and learning rates named after their param groups.

Where transformers' Trainer logs the true norm (the optimizers stepped after backward) ours equals what the real
Trainer logs on the same model, data and settings. For LOMO, AdaLomo and the layer-wise optimizers the Trainer logs
0 (the gradients are consumed inside backward before it measures them); ours is the norm the engine measured as the
gradients passed, and equals the norm of the same step's gradients computed by a plain backward on a copy of the
model. Under DDP and FSDP2 the logged norm equals one process's: tests/test_ddp.py and tests/test_sharded.py.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import Logger

from lightning_optims import OptimizerArguments, available_optimizers, get_spec
from tests.helpers import LlamaModule, TokenDataset, lightning_trainer, loader, tiny_llama
from tests.test_parity_transformers import _SequentialTrainer, training_arguments

USABLE = {r.name for r in available_optimizers() if r.usable}
STEPS, BATCH = 6, 4
# the optimizers stepped after backward, whose norm the Trainer measures (the schedule-free one in its train mode)
AFTER_BACKWARD = ["adamw_torch", "adafactor", "apollo_adamw", "grokadamw", "schedule_free_adamw"]
IN_BACKWARD = ["lomo", "adalomo"]
LAYERWISE = [
    n for n in ("apollo_adamw_layerwise", "galore_adamw_layerwise", "galore_adafactor_layerwise") if n in USABLE
]
# one name of each other family (GaLore, bitsandbytes, torchao, optimi, Muon): stepped after backward, compared with a
# plain backward as the Trainer's own number would be
OTHER_FAMILIES = [n for n in ("galore_adamw", "lion_32bit", "adamw_torch_8bit", "stable_adamw", "muon") if n in USABLE]


class RecordGradNorm(Callback):
    """The ``grad_norm`` the module measured at each step (``last_grad_norm``: what it logs where the loggers write,
    ``test_grad_norm_reaches_the_loggers_at_the_steps_they_write``)."""

    def __init__(self) -> None:
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(float(pl_module.last_grad_norm))


class PlainBackwardNorm(RecordGradNorm):
    """Also the norm of this step's gradients by a plain backward on a copy of the model as the step starts."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        copy = tiny_llama()
        copy.load_state_dict(pl_module.model.state_dict())
        copy(**batch).loss.backward()
        grads = [p.grad for p in copy.parameters() if p.grad is not None]
        self.expected.append(float(torch.nn.utils.get_total_norm(grads)))


def fit_ours(settings: dict, callback: Callback, steps: int = STEPS) -> LlamaModule:
    module = LlamaModule(model=tiny_llama(), **settings)
    lightning_trainer(steps, callbacks=[callback]).fit(module, loader(BATCH))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
@pytest.mark.parametrize("name", AFTER_BACKWARD)
def test_grad_norm_equals_what_the_trainer_logs(tmp_path, name, max_grad_norm):
    ta = training_arguments(
        tmp_path,
        name,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        max_grad_norm=max_grad_norm,
    )
    hf_trainer = _SequentialTrainer(model=tiny_llama(), args=ta, train_dataset=TokenDataset())
    hf_trainer.train()
    theirs = [entry["grad_norm"] for entry in hf_trainer.state.log_history if "grad_norm" in entry]

    record = RecordGradNorm()
    fit_ours(OptimizerArguments.from_training_arguments(ta).as_kwargs(), record)
    if not theirs and max_grad_norm == 0:  # (transformers 5.0 logs grad_norm only where it clips; 5.25 at each step)
        assert len(record.logged) == STEPS  # (logged here at every step whatever the installed transformers)
        return
    assert len(theirs) == len(record.logged) == STEPS
    # the norms grow past max_grad_norm=1.0 within the run: clipped steps are among those compared
    assert max(theirs) > 1.0
    # the same gradients summed in another order (the optimizer's groups, not the model's parameter order): measured
    # at most one float32 ulp apart (1.2e-7 relative) over these 10 runs
    torch.testing.assert_close(torch.tensor(record.logged), torch.tensor(theirs), rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "max_grad_norm"),
    [(n, norm) for n in IN_BACKWARD + OTHER_FAMILIES for norm in (1.0, 0.0)] + [(n, 0.0) for n in LAYERWISE],
)
def test_grad_norm_equals_a_plain_backward(tmp_path, name, max_grad_norm):
    """For LOMO, AdaLomo and the layer-wise names the Trainer logs 0 (measured: the fused backward frees each gradient
    before it looks); ours is the norm the engine summed as the gradients passed, equal to a plain backward's on the
    same weights and batch. The other families' norm is compared the same way."""
    settings = {"optim": name, "learning_rate": 1e-2, "max_grad_norm": max_grad_norm}
    spec = get_spec(name)
    if spec.needs_target_modules:
        settings.update(optim_target_modules="all-linear")
    if spec.params == "low_rank":
        settings.update(optim_args="rank=2,update_proj_gap=2")
    record = PlainBackwardNorm()
    module = fit_ours(settings, record)
    assert len(record.logged) == len(record.expected) == STEPS
    if max_grad_norm:
        assert max(record.expected) > max_grad_norm  # clipped steps are among those compared
    # per-bucket norms combined vs one norm over all: measured at most one float32 ulp apart (1.2e-7 relative)
    torch.testing.assert_close(torch.tensor(record.logged), torch.tensor(record.expected), rtol=1e-6, atol=0)
    moved = module.model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, tiny_llama().state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_the_trainer_logs_zero_for_lomo(tmp_path):
    """Why the in-backward names are not compared with the Trainer: it measures after the fused backward."""
    ta = training_arguments(
        tmp_path, "lomo", max_steps=2, per_device_train_batch_size=BATCH, logging_steps=1, save_strategy="no"
    )
    hf_trainer = _SequentialTrainer(model=tiny_llama(), args=ta, train_dataset=TokenDataset())
    hf_trainer.train()
    logged = [e["grad_norm"] for e in hf_trainer.state.log_history if "grad_norm" in e]
    assert logged in ([0.0, 0.0], []), logged  # (0.0 at each step on the newest transformers, nothing on 5.0)


class KeysLogger(Logger):
    """Every metric key logged (what a CSV or TensorBoard logger would write)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()
        self.written: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "keys"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.keys.update(metrics)
        self.written.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(optim="adamw_torch", weight_decay=0.1), {"lr-AdamW/decay", "lr-AdamW/no_decay"}),
        (
            dict(optim="apollo_adamw", optim_target_modules="all-linear", optim_args="rank=2"),
            {"lr-APOLLOAdamW/full_rank", "lr-APOLLOAdamW/low_rank"},
        ),
        (dict(optim="lomo"), {"lr-Lomo/all"}),
    ],
)
def test_learning_rate_monitor_keys_name_the_groups(settings, expected):
    logger = KeysLogger()
    module = LlamaModule(model=tiny_llama(), learning_rate=1e-3, **settings)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = lightning_trainer(2, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    trainer.fit(module, loader(BATCH))
    assert {k for k in logger.keys if k.startswith("lr-")} == expected
    assert "grad_norm" in logger.keys  # the logger receives it too


class EveryNorm(Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(pl_module.last_grad_norm))


def test_grad_norm_reaches_the_loggers_at_the_steps_they_write():
    """``grad_norm`` goes through ``self.log`` at the steps the loggers write (every ``log_every_n_steps``, as
    transformers logs it at its ``logging_steps``), with that step's value; the steps between pay no ``self.log``
    (without a logger: none at all), and ``last_grad_norm`` holds every step's value."""
    logger, every = KeysLogger(), EveryNorm()
    module = LlamaModule(model=tiny_llama(), learning_rate=1e-3)
    lightning_trainer(6, logger=logger, log_every_n_steps=2, callbacks=[every]).fit(module, loader(BATCH))
    written = [(step, metrics["grad_norm"]) for step, metrics in logger.written if "grad_norm" in metrics]
    assert [step for step, _ in written] == [1, 3, 5]
    assert [value for _, value in written] == [every.norms[1], every.norms[3], every.norms[5]]
    quiet = LlamaModule(model=tiny_llama(), learning_rate=1e-3)
    trainer = lightning_trainer(2)  # (no logger)
    trainer.fit(quiet, loader(BATCH))
    assert "grad_norm" not in trainer.callback_metrics and quiet.last_grad_norm is not None
