"""Typed parsing of ``optim_args``.

transformers keeps ``optim_args`` as strings and each handler casts by hand (``bool("False")`` is True), unknown
keys are dropped without a word. Here every optimizer declares its accepted keys as :class:`Arg` entries and the
string (``"rank=64,scale=2"``) or mapping (from YAML) is parsed once, against that table.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Arg", "OptimizerSettingError", "parse_optim_args"]


class OptimizerSettingError(ValueError):
    """A setting was refused: the message names the setting as written and what is accepted."""


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class Arg:
    """One accepted ``optim_args`` key: its type, its default (transformers' default) and allowed values."""

    name: str
    type: type
    default: Any
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def convert(self, value: Any, optim: str) -> Any:
        """Return ``value`` as this argument's type, or raise :class:`OptimizerSettingError`."""
        where = f"optim_args: {self.name}={value!r} for {optim}"
        if isinstance(value, str):
            value = self._from_string(value.strip(), where)
        elif self.type is bool:
            if not isinstance(value, bool):
                raise OptimizerSettingError(f"{where}: expected a boolean (true/false)")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise OptimizerSettingError(f"{where}: expected an integer")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptimizerSettingError(f"{where}: expected a number")
            value = float(value)
        elif self.type is str:
            raise OptimizerSettingError(f"{where}: expected a string")
        elif self.type is tuple:  # (a YAML list)
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise OptimizerSettingError(f"{where}: expected numbers, as a list or as a:b:c")
            value = tuple(float(v) for v in value)
        if self.type is tuple and self.default is not None and len(value) != len(self.default):
            raise OptimizerSettingError(f"{where}: expected {len(self.default)} numbers")
        if self.type is float and not math.isfinite(value):
            raise OptimizerSettingError(f"{where}: expected a finite number")
        if self.choices is not None and value not in self.choices:
            accepted = ", ".join(repr(c) for c in self.choices)
            raise OptimizerSettingError(f"{where}: accepted values are {accepted}")
        return value

    def _from_string(self, text: str, where: str) -> Any:
        if self.type is str:
            return text
        if self.type is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise OptimizerSettingError(f"{where}: expected a boolean (true/false, 1/0, yes/no)")
        if self.type is int:
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    as_float = math.nan
                if math.isfinite(as_float) and as_float.is_integer():
                    return int(as_float)
                raise OptimizerSettingError(f"{where}: expected an integer") from None
        if self.type is float:
            try:
                return float(text)
            except ValueError:
                raise OptimizerSettingError(f"{where}: expected a number") from None
        if self.type is tuple:  # ("a:b:c": commas separate optim_args' pairs)
            try:
                numbers = tuple(float(item) for item in text.split(":"))
            except ValueError:
                raise OptimizerSettingError(f"{where}: expected numbers separated by ':', such as 1.5:-2:0.5") from None
            if not all(math.isfinite(x) for x in numbers):
                raise OptimizerSettingError(f"{where}: expected finite numbers")
            return numbers
        raise TypeError(f"unsupported Arg type {self.type!r}")  # a registry bug, not user input


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def closest(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    """A ``did you mean`` suffix for an unknown name, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates))  # (difflib's defaults: 3 at most, similarity 0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


def split_optim_args(text: str) -> dict[str, str]:
    """Split transformers' ``"k=v,k=v"`` syntax (spaces removed, as transformers does)."""
    result: dict[str, str] = {}
    for fragment in text.replace(" ", "").split(","):
        if fragment == "":
            continue
        if fragment.count("=") != 1:
            raise OptimizerSettingError(
                f"optim_args: fragment {fragment!r} is not of the form key=value; "
                f"expected key=value pairs separated by commas, e.g. 'rank=64,scale=2'"
            )
        key, value = fragment.split("=")
        if key == "":
            raise OptimizerSettingError(f"optim_args: fragment {fragment!r} has no key before '='")
        if key in result:
            raise OptimizerSettingError(f"optim_args: key {key!r} is given twice")
        result[key] = value
    return result


def parse_optim_args(raw: str | Mapping[str, Any] | None, arguments: tuple[Arg, ...], optim: str) -> dict[str, Any]:
    """Parse ``raw`` against ``arguments``; return every declared key, defaults filled in.

    Raises :class:`OptimizerSettingError` for an unknown key, a fragment without ``=``, a value of the wrong type
    or outside the accepted choices.
    """
    if raw is None:
        given: Mapping[str, Any] = {}
    elif isinstance(raw, str):
        given = split_optim_args(raw)
    elif isinstance(raw, Mapping):
        given = raw
    else:
        raise OptimizerSettingError(
            f"optim_args: expected a 'key=value,key=value' string or a mapping, got {type(raw).__name__}"
        )
    table = {a.name: a for a in arguments}
    result = {a.name: a.default for a in arguments}
    for key, value in given.items():
        if not isinstance(key, str):
            raise OptimizerSettingError(f"optim_args: key {key!r} is not a string")
        if key not in table:
            if table:
                accepted = f"accepted: {', '.join(table)}{closest(key, list(table))}"
            else:
                accepted = "it takes no optim_args"
            raise OptimizerSettingError(f"optim_args: unknown key {key!r} for {optim}; {accepted}")
        result[key] = table[key].convert(value, optim)
    return result
