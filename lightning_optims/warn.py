"""Warnings that point at the user's line: the first frame outside this package (and outside the ``__init__`` a
dataclass generates), however deep inside the package the warning is raised."""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType

__all__ = ["warn_user"]

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
