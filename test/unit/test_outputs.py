"""Output folders: a command writes into a new or empty folder, replaces only its own earlier
output and only when asked, and builds a folder beside its target before renaming it in."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantvla_ros.atomic import atomic_dir
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.outputs import OutputKind, check_output_folder, only_entries

pytestmark = pytest.mark.unit
REPORT = OutputKind("a report", lambda p: only_entries(p, names={"report.md"}))


def test_new_and_empty_folders_are_taken_as_they_are(tmp_path):
    assert check_output_folder(tmp_path / "new", "--out", REPORT, overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "--out", REPORT, overwrite=False) is False


def test_another_folder_or_a_file_is_refused_whatever_the_flag(tmp_path):
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "bag.mcap").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(QuantVLAError, match=r"--out .*bag is a non-empty folder that is not a report"):
            check_output_folder(tmp_path / "bag", "--out", REPORT, overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuantVLAError, match="is an existing file"):
        check_output_folder(tmp_path / "file", "--out", REPORT, overwrite=True)


def test_an_earlier_output_is_replaced_only_when_asked(tmp_path):
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(QuantVLAError, match="already holds a report; pass --overwrite to replace it"):
        check_output_folder(tmp_path, "--out", REPORT, overwrite=False)
    assert check_output_folder(tmp_path, "--out", REPORT, overwrite=True) is True


def build(target: Path, fail: bool) -> None:
    with atomic_dir(target) as staging:
        staging.mkdir()
        (staging / "new.txt").write_text("new")
        if fail:
            raise RuntimeError("interrupted")


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        build(target, fail=True)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    build(target, fail=False)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch left beside it
