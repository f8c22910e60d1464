"""Hugging Face Trainer optimizer settings for PyTorch Lightning."""

from lightning_optims.arguments import DEFAULT_OPTIM, OptimizerArguments
from lightning_optims.build import create_optimizer, create_scheduler
from lightning_optims.callbacks import GrokkingSignalCallback, ScheduleFreeCallback
from lightning_optims.errors import NonFiniteGradientError, NonFiniteLossError
from lightning_optims.mixin import OptimizerMixin
from lightning_optims.optim_args import Arg, OptimizerSettingError
from lightning_optims.registry import (
    OptimizerAvailability,
    available_optimizers,
    get_spec,
    register,
    registered_names,
)
from lightning_optims.spec import OptimizerSpec, Sharding

__all__ = [
    "DEFAULT_OPTIM",
    "Arg",
    "GrokkingSignalCallback",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "OptimizerArguments",
    "OptimizerAvailability",
    "OptimizerMixin",
    "OptimizerSettingError",
    "OptimizerSpec",
    "ScheduleFreeCallback",
    "Sharding",
    "available_optimizers",
    "create_optimizer",
    "create_scheduler",
    "get_spec",
    "register",
    "registered_names",
]

__version__ = "0.1.0"
