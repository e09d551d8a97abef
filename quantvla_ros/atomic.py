"""Atomic file writes: a temp file beside the target, fsynced, then renamed over it.

An interrupted run therefore leaves either the old file or the new one, never half of one.
Every layer writes its artifacts, buffers and checkpoints through here; `atomic_dir` does the
same for a whole folder (an artifact, a bag), and `check_target` lets a long job refuse an output
path it could never write before it starts, rather than after.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantvla_ros.errors import QuantVLAError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path to write; it replaces `target` only if the block finishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are shared with other users
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a path beside `target`, not yet created, to build a folder at; the folder replaces
    `target` (and whatever folder was there) only if the block finishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield scratch / "new"
        os.chmod(scratch / "new", 0o755)  # mkdtemp's folders are private; outputs are shared like files
        if target.exists():
            os.replace(target, scratch / "old")
        os.replace(scratch / "new", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def check_target(target: Path, what: str, folder: bool = False) -> None:
    """Raise one sentence naming `what` if `target` cannot become a new or replaced file (or `folder`)."""
    target = Path(target)
    kind = "folder" if folder else "file"
    if target.exists() and target.is_dir() != folder:
        raise QuantVLAError(
            f"{what} {target} is an existing {'folder' if target.is_dir() else 'file'}; give the path of a {kind}."
        )
    parent = next(p for p in target.absolute().parents if p.exists())
    if not parent.is_dir():
        raise QuantVLAError(f"{what} {target} lies under {parent}, which is a file; give a path inside a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantVLAError(f"{what} {target} cannot be written: {parent} is not writable by this user.")
