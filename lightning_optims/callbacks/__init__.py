from lightning_optims.callbacks.hooks import GradientHookCleanup
from lightning_optims.callbacks.runtime import OptimizerCallback
from lightning_optims.families.grokadamw import GrokkingSignalCallback
from lightning_optims.families.schedule_free import ScheduleFreeCallback, is_schedule_free

__all__ = [
    "GradientHookCleanup",
    "GrokkingSignalCallback",
    "OptimizerCallback",
    "ScheduleFreeCallback",
    "is_schedule_free",
]
