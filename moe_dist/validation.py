"""Config errors and the checks every config section uses (moe_dist/config.py and each method's
section in moe_dist/methods/). An error names the field by its full path (`epng.decay`), so a
user knows which line of the recipe or which override to fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    pass


def positive(section: Any, path: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{path}.{name} must be > 0, got {getattr(section, name)}")


def non_negative(section: Any, path: str, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(f"{path}.{name} must be >= 0, got {getattr(section, name)}")


def fraction(section: Any, path: str, *names: str, closed: bool = False) -> None:
    """In [0, 1) (or [0, 1] with `closed`)."""
    for name in names:
        v = getattr(section, name)
        if not (0 <= v <= 1 if closed else 0 <= v < 1):
            raise ConfigError(f"{path}.{name} must be in [0, 1{']' if closed else ')'}, got {v}")


def one_of(section: Any, path: str, name: str, allowed: tuple) -> None:
    if getattr(section, name) not in allowed:
        raise ConfigError(f"{path}.{name} must be one of {list(allowed)}, got {getattr(section, name)!r}")
