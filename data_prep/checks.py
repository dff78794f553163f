"""The one validator of option values, for every typed options dataclass in the project (shard
config, process and fetch options, S3 settings, the training config).

Each check names the option as its caller labels it (``shard config `resolution```, ``config key
`train.lr```) and raises `error` (DataPrepError unless the caller's layer has its own, e.g.
training's ConfigError) with one message shape: "<what> must be <allowed>, got <value>".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from data_prep.errors import DataPrepError


def require(ok: bool, what: str, allowed: str, got: object, *, error: type[Exception] = DataPrepError) -> None:
    """Raise `error` "<what> must be <allowed>, got <got!r>" unless `ok`."""
    if not ok:
        raise error(f"{what} must be {allowed}, got {got!r}")


def is_int(value: object) -> bool:
    """An int that is not a bool (YAML's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(value: object, what: str, lo: int, hi: int | None = None, *, note: str = "",
                error: type[Exception] = DataPrepError) -> None:
    """An integer in lo..hi (hi None: no upper bound). `note` follows the bound, e.g. " (5 MiB)"."""
    allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
    require(is_int(value) and value >= lo and (hi is None or value <= hi), what, allowed + note, value, error=error)


def require_number(value: object, what: str, *, lo: float = 0.0, inclusive: bool = True, note: str = "",
                   error: type[Exception] = DataPrepError) -> None:
    """A finite number (not a bool) >= lo, or > lo when not `inclusive`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= lo if inclusive else value > lo)
    require(ok, what, f"a number {'>=' if inclusive else '>'} {lo:g}{note}", value, error=error)


def require_choice(value: object, what: str, allowed: Sequence[str], *,
                   error: type[Exception] = DataPrepError) -> None:
    """One of `allowed`."""
    require(value in allowed, what, f"one of {', '.join(allowed)}", value, error=error)


def require_bool(value: object, what: str, *, error: type[Exception] = DataPrepError) -> None:
    """True or False, not a truthy stand-in."""
    require(isinstance(value, bool), what, "true or false", value, error=error)


def require_plain_name(name: object, what: str, *, error: type[Exception] = DataPrepError) -> str:
    """A name read from storage (a part, shard, samples file or checkpoint tag) that is joined to a
    folder: one path component, so it cannot point outside it. No separator, not `.` or `..`, not
    absolute, no NUL. Returns it."""
    ok = (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
          and not (len(name) > 1 and name[1] == ":"))  # C:foo on Windows
    require(ok, what, "one plain name (no '/', '\\\\', '..' or drive)", name, error=error)
    return name
