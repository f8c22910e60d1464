"""Warnings that point at the user's line: the first frame outside this package (and outside the ``__init__`` a
dataclass generates), however deep inside the package the warning is raised; and the upstream packages' known,
harmless import-time messages kept off the first screen (:func:`quiet_upstream_noise`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import FrameType

__all__ = ["quiet_upstream_noise", "warn_user"]

#: (logger, start of the message) that upstream packages log when imported, harmless for this package's use: torch's
#: note on torchao's enums, always; on a machine without a GPU, torchao's CUDA extensions and bitsandbytes' CPU kernel
#: from the kernels hub failing to load (neither is used on the CPU)
_NOISE = (("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),)
_NOISE_WITHOUT_GPU = (
    ("torchao", "Failed to load "),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _KnownNoise(logging.Filter):
    """Drops the records of one logger whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_upstream_noise() -> None:
    """Drop the messages of :data:`_NOISE` (and, without a GPU, of :data:`_NOISE_WITHOUT_GPU`) from their loggers,
    for the process (each filter matches one message of one logger; nothing else is hidden). Called when an optimizer
    class is imported (torchao, bitsandbytes, GaLore through bitsandbytes) and by the examples' entry point (where
    transformers imports torchao)."""
    import torch

    noise = _NOISE + (() if torch.cuda.is_available() else _NOISE_WITHOUT_GPU)
    for name, text in noise:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_KnownNoise(text))


_PACKAGE = str(Path(__file__).resolve().parent)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside ``lightning_optims``."""
    import warnings

    level: int = 1
    frame: FrameType | None = sys._getframe(1)  # (the function that warns: stacklevel 2)
    while frame is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def _inside(frame: FrameType) -> bool:
    code = frame.f_code
    generated_init = code.co_filename == "<string>" and code.co_name == "__init__"  # (a dataclass's, such as ours)
    return code.co_filename.startswith(_PACKAGE) or generated_init
