"""Output folders: what a command may write into, and what it may replace.

A command that writes a folder (an artifact, demo bags, a trained checkpoint, a fidelity or
evaluation report) never deletes or overwrites what it did not write. A missing or empty folder
is used as it is; a folder holding the command's own earlier output is replaced only when the
user asks (`--overwrite`); any other non-empty folder is refused before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantvla_ros.atomic import check_target
from quantvla_ros.errors import QuantVLAError


@dataclass(frozen=True)
class OutputKind:
    noun: str  # "a quantized artifact", as the messages name it
    recognise: Callable[[Path], bool]  # True for a non-empty folder this kind of output may replace


def only_entries(path: Path, names: set[str] | None = None, suffixes: set[str] | None = None) -> bool:
    """Every entry of `path` is one of `names` or a file with one of `suffixes`."""
    return all(e.name in (names or set()) or (e.is_file() and e.suffix in (suffixes or set())) for e in path.iterdir())


def check_output_folder(
    path: Path | str, what: str, kind: OutputKind, overwrite: bool, flag: str = "--overwrite"
) -> bool:
    """Raise one sentence unless `path` may receive `kind`; True when it holds an earlier one that will be replaced."""
    path = Path(path)
    check_target(path, what, folder=True)
    if not path.exists() or not any(path.iterdir()):
        return False
    if not kind.recognise(path):
        raise QuantVLAError(
            f"{what} {path} is a non-empty folder that is not {kind.noun}; nothing in it was touched, "
            "give a new or empty folder."
        )
    if not overwrite:
        raise QuantVLAError(
            f"{what} {path} already holds {kind.noun}; pass {flag} to replace it, or give another folder."
        )
    return True
