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


def is_previous_export(out: Path) -> bool:
    return out.is_dir() and (out / EXPORT_INFO).is_file()


def check_output_dir(out: Path, replace_previous: bool = False) -> None:
    if replace_previous and is_previous_export(out):
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory (nothing was written; remove it or "
                          "choose another)")


@contextlib.contextmanager
def staged_dir(out: str | Path, replace_previous: bool = False) -> Iterator[Path]:
    """Yields a fresh temp dir; on success it becomes `out`, on any error it is removed.
    `replace_previous`: an earlier export in `out` (end-of-training exports of a resumed run)
    is swapped out only once the new one is complete."""
    out = Path(out)
    check_output_dir(out, replace_previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, replace_previous)  # someone may have written there meanwhile
        if replace_previous and is_previous_export(out):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_info(directory: Path, info: dict) -> None:
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=2))
