"""An export is written into a temp directory beside its target and renamed at the end, so an
interrupted or failed export leaves nothing half-written under the name a user would load."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moe_dist.export.trained import ExportError

EXPORT_INFO = "moe_dist_export.json"


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory (nothing was written; remove it or "
                          "choose another)")


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yields a fresh temp dir; on success it becomes `out`, on any error it is removed."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out)  # someone may have written there meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_info(directory: Path, info: dict) -> None:
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=2))
