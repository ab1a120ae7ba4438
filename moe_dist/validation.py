"""Config errors and the checks every config section uses (moe_dist/config.py and each method's
section in moe_dist/methods/). An error names the field by its full path (`epng.decay`), so a
user knows which line of the recipe or which override to fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
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


def check_ds_config(path: str) -> None:
    """Exists and is JSON (found before any model is built, not by DeepSpeed after)."""
    if not Path(path).is_file():
        raise ConfigError(f"ds_config: no such file {path!r}")
    try:
        json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ds_config {path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def check_writable(output_dir: str) -> None:
    """The directory exists and is writable, or can be created: checked without creating it."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir!r} is not writable: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir!r} is not writable: no write permission on {existing}")
