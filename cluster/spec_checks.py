"""Validation for the deployment spec (cluster/spec.py): per-field checks and the dict -> dataclass builder.

Every spec dataclass derives from `Checked`. Each field names its check in its metadata; a
check normalises the value (list -> tuple, int -> float, ...) or raises `Invalid` with the
problem. `Checked.__post_init__` turns that into a SpecError naming the field, and a nested
section prefixes its own name, so an error reads from the top of the file down:
"prefill.replicas: must be an integer >= 0, got -1".
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


class SpecError(ValueError):
    """The deployment spec is wrong; the message starts with the field's path."""


class Invalid(Exception):
    """A check's verdict on one value (no path yet): what the value must be."""


Check = Callable[[Any], Any]


def integer(lo: int, hi: int | None = None) -> Check:
    def check(value: Any) -> int:
        # bool is an int in Python; `replicas: true` is a typo, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
                hi is not None and value > hi):
            raise Invalid(f"must be an integer in {lo}..{hi}" if hi is not None
                          else f"must be an integer >= {lo}")
        return value
    return check


def number(lo: float, hi: float | None = None, lo_open: bool = False) -> Check:
    """A real number in [lo, hi] ((lo, hi] when lo_open); ints are taken as floats."""
    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            bound = f"{'>' if lo_open else '>='} {lo:g}" if hi is None else (
                f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
            raise Invalid(f"must be a number {bound}")
        return float(value)
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a non-empty string")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}")
        return value
    return check


def optional(inner: Check) -> Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)
    return check


def text_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise Invalid("must be a list of non-empty strings")
    return tuple(value)


def resource_map(value: Any) -> Mapping[str, float]:
    """Custom Ray resources, e.g. {prefill: 1}; read-only so the frozen spec stays frozen."""
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v >= 0 for k, v in value.items()):
        raise Invalid("must be a mapping of resource name to a number >= 0")
    if {"CPU", "GPU", "memory"} & set(value):
        raise Invalid("must not name CPU, GPU or memory (use num_cpus / num_gpus)")
    return MappingProxyType({k: float(v) for k, v in value.items()})


def section(cls: type, **defaults: Any) -> Check:
    """A nested section: a mapping (from YAML) is built into `cls`; `defaults` are this
    section's own defaults where they differ from cls's (decode's max_num_seqs)."""
    def check(value: Any) -> Any:
        return value if isinstance(value, cls) else from_mapping(cls, value, defaults)
    return check


def spec_field(default: Any = dataclasses.MISSING, check: Check | None = None, *,
               factory: Callable[[], Any] | None = None, secret: bool = False,
               **kwargs: Any) -> Any:
    """dataclasses.field with the field's check in its metadata; a secret field's value
    stays out of error messages and repr (API keys end up in logs otherwise)."""
    metadata = {"check": check, "secret": secret}
    if secret:
        kwargs["repr"] = False
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


class Checked:
    """Base of the spec dataclasses: runs each field's check, then `validate` (cross-field)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, f.name)
            try:
                normalised = check(value)
            except Invalid as e:
                shown = "<hidden>" if f.metadata.get("secret") else _show(value)
                raise SpecError(f"{f.name}: {e}, got {shown}") from None
            except SpecError as e:  # from a nested section: prefix its path with ours
                raise SpecError(f"{f.name}.{e}") from None
            object.__setattr__(self, f.name, normalised)  # frozen: normalise in place once
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise SpecError with the field's path relative to this section."""


def from_mapping(cls: type, data: Any, defaults: Mapping[str, Any] | None = None) -> Any:
    """Builds `cls` from a YAML mapping. Unknown keys are errors (a typo must not silently
    fall back to a default); a missing section (None) means all defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise Invalid("must be a mapping")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            raise SpecError(f"{key}: unknown field{hint}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise SpecError(f"{f.name}: required field is missing")
    return cls(**{**(defaults or {}), **data})


def to_plain(value: Any) -> Any:
    """A spec value as YAML-able builtins: dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
