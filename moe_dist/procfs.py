"""What Linux's /proc says about a process (the launcher chain, a peer rank): read-only,
None / False / "" where the process is gone or the platform has no /proc."""

from __future__ import annotations


def _stat(pid: int) -> list[str] | None:
    """The fields after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def running(pid: int) -> bool:
    """Alive and not a zombie (exited, not yet reaped by its parent)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
