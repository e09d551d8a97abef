"""The `quantvla` command as a new user meets it: mistakes end in one sentence, found before
anything slow runs, and a reader that stops early is not an error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from quantvla_ros.cli import main

from conftest import ACTION_DIM, STATE_DIM

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


def test_every_command_is_listed_with_its_own_usage_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert "record-demos" in listing and "train-demo" in listing
    for command in ("record-demos", "train-demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: quantvla {command} [-h]")


def test_predict_prints_latency_and_dt_in_utf8(checkpoints, tmp_path, capsys):
    frame = tmp_path / "frame.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frame)
    args = ["predict", str(checkpoints[(True, "openpi")]), "--image", f"base_0_rgb={frame}", "--instruction", "go"]
    assert main([*args, "--state", ",".join(["0"] * STATE_DIM), "--seed", "0"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text)
    assert out["model"] == "π0.5" and "\\u03c0" not in text and out["latency_ms"] > 0 and out["device"] == "cpu"
    assert len(out["actions"][0]) == ACTION_DIM and "action_names" not in out  # this checkpoint names none


def test_predict_checks_cameras_and_state_against_the_checkpoint_before_loading_it(checkpoints, tmp_path, capsys):
    frame = tmp_path / "frame.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frame)
    path = checkpoints[(True, "openpi")]
    args = ["predict", str(path), "--instruction", "go", "--device", "no-such-device"]
    # A device name that cannot load anything shows the checks ran first.
    assert main([*args, "--image", f"top={frame}", "--state", ",".join(["0"] * STATE_DIM)]) == 2
    assert "Observation camera(s) ['top'] are not inputs of this policy" in capsys.readouterr().err
    assert main([*args, "--image", f"base_0_rgb={frame}", "--state", "0,1"]) == 2
    assert f"The state has 2 values but this policy expects {STATE_DIM}" in capsys.readouterr().err
    assert main(["predict", "pi05_full", *args[2:], "--image", f"base_0_rgb={frame}", "--state", "0"]) == 2
    assert "pi05_full is not a folder" in capsys.readouterr().err
