"""The `quantvla` command as a new user meets it: mistakes end in one sentence, found before
anything slow runs, and a reader that stops early is not an error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantvla_ros.cli import main

pytestmark = pytest.mark.integration


def test_a_reader_that_stops_early_gets_no_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantvla_ros.cli", "info", "pi05_full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize(
    "layout", [["--layout", "custom", "--include", r"nothing\.matches"], ["--exclude", ".*"]], ids=["custom", "exclude"]
)
def test_a_layout_that_selects_nothing_is_one_sentence(checkpoints, capsys, layout):
    assert main(["layout", str(checkpoints[(True, "openpi")]), *layout]) == 2
    err = capsys.readouterr().err
    assert "selects no Linear layer of this model; check its patterns" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "base_0_rgb=x.png", "--state", "0.1,zero"], "--state '0.1,zero' must be comma-separated numbers"),
        (["--image", "frame.png", "--state", "0.1"], "--image 'frame.png' must look like CAMERA=FILE"),
    ],
    ids=["state", "image"],
)
def test_predict_checks_its_arguments_before_loading_the_policy(tmp_path, capsys, args, message):
    assert main(["predict", str(tmp_path / "not_loaded_yet"), "--instruction", "go", *args]) == 2
    assert message in capsys.readouterr().err


def test_fidelity_checks_its_candidates_before_loading_the_reference(checkpoints, tmp_path, capsys):
    float_path = checkpoints[(True, "openpi")]
    args = ["fidelity", "--reference", str(tmp_path / "nope"), "--buffer", str(tmp_path / "b.safetensors")]
    assert main([*args, "--candidate", str(float_path), "--out", str(tmp_path / "report")]) == 2
    assert f"--candidate {float_path} is not a quantized artifact" in capsys.readouterr().err
