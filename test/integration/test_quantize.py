"""QuantVLA and its baselines end to end: quantize, calibrate, write and reload artifacts, report fidelity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantvla_ros.cli import main
from quantvla_ros.data.buffer import build_buffer, save_buffer
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.loader import load_policy
from quantvla_ros.models.common.checkpoint import CheckpointError
from quantvla_ros.quant import fidelity as fidelity_module
from quantvla_ros.quant.api import quantize_
from quantvla_ros.quant.artifact import load_artifact, save_artifact
from quantvla_ros.quant.calibration import collect_expert_statistics
from quantvla_ros.quant.config import method_config
from quantvla_ros.quant.fused import member_names
from quantvla_ros.quant.linear import QuantLinear

from conftest import INSTRUCTIONS, STATE_DIM, observation

pytestmark = pytest.mark.integration
METHODS = ["quantvla", "rtn", "smoothquant", "duquant"]


@pytest.fixture(scope="module")
def float_path(checkpoints) -> Path:
    return checkpoints[(True, "openpi")]


@pytest.fixture(scope="module")
def buffer(float_path):
    policy = load_policy(float_path)
    obs = [observation(seed=i, instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(6)]
    return build_buffer(policy, obs, sources=[{"bag": "synthetic", "sha256": "0" * 64}])


@pytest.fixture(scope="module")
def buffer_file(buffer, tmp_path_factory) -> Path:
    return save_buffer(buffer, tmp_path_factory.mktemp("buffers") / "calib.safetensors")


def noise(policy) -> np.ndarray:
    cfg = policy.model.cfg
    return np.random.default_rng(11).standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_artifact_reloads_to_identical_actions(float_path, buffer, tmp_path, method):
    policy = load_policy(float_path)
    record = quantize_(policy.model, method_config(method), buffer, batch_size=4, progress=False)
    assert record.modules and all(isinstance(policy.model.get_submodule(n), QuantLinear) for n in record.modules)
    linears = {member for name in record.modules for member in member_names(name)}
    assert linears == set(method_config(method).layout.select(load_policy(float_path).model))
    out = save_artifact(policy.model, policy.info, record, tmp_path / method, {"samples": len(buffer)})
    reloaded = load_policy(out)
    assert reloaded.quant_config["method"] == method
    assert set(reloaded.quant_config["modules"]) == set(record.modules)
    eps = noise(policy)
    expected = policy.predict(observation(), eps).actions
    actions = reloaded.predict(observation(), eps).actions
    # Equal up to the summation order CPU matmul kernels pick by memory alignment; two loads
    # of the artifact are bit-identical.
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(load_policy(out).predict(observation(), eps).actions, actions)
    float_actions = load_policy(float_path).predict(observation(), eps).actions
    assert not np.array_equal(expected, float_actions)  # it really is quantized


def test_quantvla_selects_its_layout_and_drops_float_weights(float_path, buffer):
    policy = load_policy(float_path)
    record = quantize_(policy.model, method_config("quantvla"), buffer, batch_size=6, progress=False)
    state = policy.model.state_dict()
    for name in record.modules:
        assert f"{name}.weight_packed" in state and f"{name}.weight" not in state
    depth = policy.model.cfg.llm.depth
    # Per LLM layer q/k/v fused, o, gate/up fused, down; per expert layer gate/up fused and down.
    assert len(record.modules) == depth * 4 + depth * 2
    for name in record.modules:
        for member in member_names(name):
            assert f"{member}.weight" not in state
    assert all(".mlp." in n for n in record.modules if "gemma_expert" in n)
    assert record.atm_ohb is not None and record.atm_ohb.alpha.shape == (depth, policy.model.cfg.expert.num_heads)


def mean_log_mismatch(teacher, student) -> tuple[float, float]:
    logit = (teacher.logit_std() / student.logit_std()).log().abs().mean().item()
    rms = (teacher.output_rms() / student.output_rms()).log().abs().mean().item()
    return logit, rms


def test_atm_and_ohb_bring_the_student_closer_to_the_teacher(float_path, buffer):
    policy = load_policy(float_path)
    config = method_config("quantvla", w_bits=4, a_bits=4, transform="none", neutral_log=0.0)
    record = quantize_(policy.model, config, buffer, batch_size=6, progress=False)
    before = mean_log_mismatch(record.atm_ohb.teacher, record.atm_ohb.student)
    after_stats = collect_expert_statistics(policy.model, buffer, batch_size=6, seed=config.seed)
    after = mean_log_mismatch(record.atm_ohb.teacher, after_stats)
    assert (record.atm_ohb.alpha != 1).any() and (record.atm_ohb.beta != 1).any()
    assert after[0] < before[0], (before, after)
    assert after[1] < before[1], (before, after)


def test_corrupted_or_truncated_artifacts_refuse_to_load(float_path, buffer, tmp_path):
    policy = load_policy(float_path)
    record = quantize_(policy.model, method_config("rtn"), None, progress=False)
    good = save_artifact(policy.model, policy.info, record, tmp_path / "good")
    for damage in ("flip", "truncate"):
        bad = Path(shutil.copytree(good, tmp_path / damage))
        data = bytearray((bad / "model.safetensors").read_bytes())
        if damage == "flip":
            data[-10] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        (bad / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="does not match the SHA-256"):
            load_artifact(bad)
    (good / "quant_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is not a quant config this version reads"):
        load_artifact(good)


def edit_quant_config(artifact: Path, edit) -> None:
    qc = json.loads((artifact / "quant_config.json").read_text())
    edit(qc)
    (artifact / "quant_config.json").write_text(json.dumps(qc, indent=2))


@pytest.mark.parametrize(
    "edit",
    [
        lambda qc: qc.update(method="rtn"),
        lambda qc: qc.update(w_bits=8),
        lambda qc: qc["atm_ohb"]["alpha"][0].__setitem__(0, 1.25),
        lambda qc: next(iter(qc["modules"].values())).update(w_bits=8),
    ],
    ids=["method", "bits", "alpha", "module"],
)
def test_an_edited_quant_config_refuses_to_load(float_path, buffer, tmp_path, edit):
    policy = load_policy(float_path)
    record = quantize_(policy.model, method_config("quantvla"), buffer, batch_size=6, progress=False)
    artifact = save_artifact(policy.model, policy.info, record, tmp_path / "a")
    load_artifact(artifact)
    edit_quant_config(artifact, edit)
    with pytest.raises(CheckpointError, match=r"quant_config\.json was edited after `quantvla quantize` wrote it"):
        load_policy(artifact)


def test_an_artifact_of_the_first_format_without_fused_layers_still_loads(float_path, tmp_path):
    policy = load_policy(float_path)
    record = quantize_(policy.model, method_config("rtn", fuse_projections=False), None, progress=False)
    assert not any("+" in name for name in record.modules)
    out = save_artifact(policy.model, policy.info, record, tmp_path / "v1")

    def as_format_1(qc: dict) -> None:
        # Keys the first format did not write.
        del qc["quant_config_sha256"]
        for spec in qc["modules"].values():
            del spec["split_sizes"], spec["asymmetric_activations"]
        qc["format"] = "quantvla-artifact/1"

    edit_quant_config(out, as_format_1)
    eps = noise(policy)
    np.testing.assert_array_equal(
        load_policy(out).predict(observation(), eps).actions, policy.predict(observation(), eps).actions
    )
    edit_quant_config(out, lambda qc: qc.update(format="quantvla-artifact/9"))
    with pytest.raises(CheckpointError, match="re-run `quantvla quantize` with this version"):
        load_artifact(out)


def test_methods_that_calibrate_refuse_to_run_without_data(float_path):
    policy = load_policy(float_path)
    with pytest.raises(ValueError, match="pass a non-empty calibration buffer"):
        quantize_(policy.model, method_config("quantvla"), None, progress=False)
    # DuQuant's rotations without smoothing come from the weights alone: no data needed.
    data_free = method_config("quantvla", atm=False, ohb=False, duquant_smoothing=False)
    record = quantize_(policy.model, data_free, None, progress=False)
    assert record.modules and all("rotation1_signs" in spec["transform_kind"] for spec in record.modules.values())


def test_cli_quantize_layout_and_fidelity(float_path, buffer_file, tmp_path, capsys):
    artifacts = []
    methods = (("quantvla", ["--atm-ohb-sequential"]), ("rtn", []), ("duquant", ["--layout", "llm_and_expert_all"]))
    for method, extra in methods:
        out = tmp_path / method
        code = main(
            ["quantize", "--checkpoint", str(float_path), "--calib", str(buffer_file)]
            + ["--method", method, "--out", str(out), *extra]
        )
        assert code == 0, capsys.readouterr().err
        artifacts.append(out)
    qc = json.loads((tmp_path / "quantvla" / "quant_config.json").read_text())
    assert qc["calibration"]["samples"] == 6 and qc["calibration"]["sources"][0]["bag"] == "synthetic"
    assert len(qc["atm_ohb"]["alpha"]) == 2 and qc["model_safetensors_sha256"]
    assert qc["sequential"] is True and qc["w_bits"] == 4 and qc["transform"] == "duquant"

    capsys.readouterr()
    assert main(["layout", str(float_path), "--layout", "quantvla", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == len(qc["modules"])

    report_dir = tmp_path / "report"
    args = ["fidelity", "--reference", str(float_path), "--buffer", str(buffer_file), "--out", str(report_dir)]
    for a in artifacts:
        args += ["--candidate", str(a)]
    capsys.readouterr()
    assert main(args) == 0
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(f"Wrote {report_dir}: summary.md, sqnr_comparison.png and each candidate's JSON and plots.")
    )
    summary = (report_dir / "summary.md").read_text()
    assert all(name in summary for name in ("quantvla", "rtn", "duquant"))
    result = json.loads((report_dir / "quantvla.json").read_text())
    assert 0 <= result["action_relative_mse"] and -1 <= result["action_cosine"] <= 1
    # Every quantized Linear inference runs, a fused layer member by member: all but the last LLM
    # layer's o_proj and MLP, whose output nothing reads (the expert takes only that layer's K/V).
    last = "paligemma_with_expert.paligemma.model.language_model.layers.1."
    unread = {last + name for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    linears = {member for name in qc["modules"] for member in member_names(name)}
    assert unread <= linears and set(result["layer_sqnr_db"]) == linears - unread
    assert (report_dir / "quantvla_layer_sqnr.png").stat().st_size > 1000
    assert (report_dir / "quantvla_atm_ohb.png").stat().st_size > 1000
    assert not (report_dir / "rtn_atm_ohb.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "quantvla", "--layout", "everything"], "Unknown layout 'everything'"),
        (["--method", "quantvla", "--calib", "/nonexistent/calib.safetensors"], "does not exist"),
    ],
    ids=["unknown-layout", "missing-buffer"],
)
def test_cli_user_errors_are_one_sentence(float_path, tmp_path, capsys, args, message):
    assert main(["quantize", "--checkpoint", str(float_path), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_a_buffer_built_for_another_model(checkpoints, buffer_file, tmp_path, capsys):
    code = main(
        ["quantize", "--checkpoint", str(checkpoints[(False, "openpi")]), "--calib", str(buffer_file)]
        + ["--out", str(tmp_path / "x")]
    )
    assert code == 2
    assert "was built for another model" in capsys.readouterr().err


def test_static_activation_scales_option(float_path, buffer, tmp_path):
    policy = load_policy(float_path)
    config = method_config("rtn", static_activations=True)
    record = quantize_(policy.model, config, buffer, batch_size=6, progress=False)
    layer = policy.model.get_submodule(next(iter(record.modules)))
    assert layer.act.static and layer.input_scale is not None and (layer.input_scale > 0).all()
    assert record.modules[next(iter(record.modules))]["static_input"]
    out = save_artifact(policy.model, policy.info, record, tmp_path / "static")
    eps = noise(policy)
    expected = policy.predict(observation(), eps).actions
    np.testing.assert_allclose(load_policy(out).predict(observation(), eps).actions, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="Static activation scales need integer activations"):
        method_config("rtn", static_activations=True, a_bits=16)


def test_the_authors_choices_are_options(float_path, buffer):
    policy = load_policy(float_path)
    config = method_config(
        "quantvla", atm_clamp="linear", stat_pooling="per_call", duquant_smoothing=False, duquant_rotation="svd"
    )
    record = quantize_(policy.model, config, buffer, batch_size=6, progress=False)
    kinds = {spec["transform_kind"] for spec in record.modules.values()}
    assert kinds == {"rotation1+perm+rotation2"}
    alpha = record.atm_ohb.alpha
    assert ((alpha >= 0.7 - 1e-9) & (alpha <= 1.4 + 1e-9)).all()
    with pytest.raises(ValueError, match="Unknown statistics pooling"):
        method_config("quantvla", stat_pooling="median")


def folder_snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_quantize_never_deletes_a_folder_it_did_not_write(float_path, tmp_path, capsys):
    bag = tmp_path / "bag"
    bag.mkdir()
    (bag / "bag.mcap").write_bytes(b"recorded data")
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    parent = tmp_path / "models"
    shutil.copytree(float_path, parent / "pi05")
    for out in (bag, parent):
        before = folder_snapshot(out)
        assert main(["quantize", "--checkpoint", str(float_path), "--method", "rtn", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is a non-empty folder that is not a quantized artifact" in err
        assert folder_snapshot(out) == before


def test_quantize_replaces_an_artifact_only_with_overwrite(float_path, tmp_path, capsys):
    out = tmp_path / "w4"
    args = ["quantize", "--checkpoint", str(float_path), "--method", "rtn", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "quant_config.json").read_text())["created"]
    assert main(args) == 2
    assert "already holds a quantized artifact; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--w-bits", "8", "--overwrite"]) == 0
    assert json.loads((out / "quant_config.json").read_text())["w_bits"] == 8 and first
    assert [p.name for p in tmp_path.iterdir()] == ["w4"]


def test_fidelity_refuses_a_folder_that_is_not_a_report(float_path, buffer_file, tmp_path, capsys):
    artifact = tmp_path / "rtn"
    assert main(["quantize", "--checkpoint", str(float_path), "--method", "rtn", "--out", str(artifact)]) == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "summary.md").write_text("my own notes")
    (notes / "todo.txt").write_text("keep")
    before = folder_snapshot(notes)
    args = ["fidelity", "--reference", str(float_path), "--buffer", str(buffer_file), "--candidate", str(artifact)]
    assert main([*args, "--out", str(notes), "--overwrite"]) == 2
    assert "is a non-empty folder that is not a fidelity report" in capsys.readouterr().err
    assert folder_snapshot(notes) == before
    report = tmp_path / "report"
    assert main([*args, "--out", str(report)]) == 0
    assert main([*args, "--out", str(report)]) == 2
    assert "already holds a fidelity report" in capsys.readouterr().err
    assert main([*args, "--out", str(report), "--overwrite"]) == 0


def test_cuda_on_a_machine_without_it_is_one_sentence(float_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    frame = tmp_path / "frame.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frame)
    state = ",".join(["0"] * STATE_DIM)
    commands = [
        ["quantize", "--checkpoint", str(float_path), "--method", "rtn", "--out", str(tmp_path / "x")],
        ["predict", str(float_path), "--image", f"base_0_rgb={frame}", "--instruction", "go", "--state", state],
    ]
    for args in commands:
        assert main([*args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "Device 'cuda' is not available here" in err and "--device" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_layout_estimates_what_the_default_quantize_writes(float_path, buffer_file, tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["quantize", "--checkpoint", str(float_path), "--calib", str(buffer_file), "--out", str(out)]) == 0
    written = capsys.readouterr().out
    assert "quantvla W4A8" in written and "ATM: " in written and "heads outside the neutral band" in written
    qc = json.loads((out / "quant_config.json").read_text())
    assert main(["layout", str(float_path), "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in estimate["modules"]] == list(qc["modules"])
    # Layers whose output inference never reads get no calibrated smoothing vector (4 bytes per input).
    unsmoothed = sum(4 * s["in_features"] for s in qc["modules"].values() if "smooth" not in s["transform_kind"])
    assert estimate["quantized_bytes"] == qc["weight_bytes"]["quantized"] + unsmoothed
    assert main(["layout", str(float_path), "--method", "rtn", "--w-bits", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] < 0.55


def test_layout_and_info_of_an_artifact_report_its_own_quantization(float_path, buffer_file, tmp_path, capsys):
    out = tmp_path / "w8a8"
    args = ["quantize", "--checkpoint", str(float_path), "--calib", str(buffer_file), "--out", str(out)]
    assert main([*args, "--w-bits", "8", "--a-bits", "8", "--layout", "llm_only"]) == 0
    capsys.readouterr()
    qc = json.loads((out / "quant_config.json").read_text())
    assert main(["layout", str(float_path), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["linear_layers"]
    assert main(["layout", str(out)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    linears = sum(len(spec["split_sizes"] or [None]) for spec in qc["modules"].values())
    assert linears > len(qc["modules"])  # q/k/v and gate/up were fused
    assert (
        f"quantvla, layout llm_only: {linears} of {total} Linear layers quantized, as {len(qc['modules'])} layers "
        "(q/k/v and gate/up fused), to W8A8" in last
    )
    assert main(["layout", str(out), "--w-bits", "4"]) == 2
    assert "is an artifact, whose quantization is fixed; drop --w-bits" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "π0.5" in text and "\\u03c0" not in text
    quant = json.loads(text)["quantization"]
    assert quant["method"] == "quantvla" and quant["bits"] == "W8A8" and quant["layout"] == "llm_only"
    assert quant["per_group"] == {"llm": len(qc["modules"])}
    assert quant["atm_ohb"]["atm"]["heads"] == len(qc["atm_ohb"]["alpha"]) * len(qc["atm_ohb"]["alpha"][0])
    assert quant["calibration"]["samples"] == 6 and quant["calibration"]["bags"] == ["synthetic"]
    assert quant["ratio"] == pytest.approx(qc["weight_bytes"]["ratio"])


def test_fidelity_keeps_same_named_candidates_apart_and_writes_each_as_it_finishes(
    float_path, buffer_file, tmp_path, capsys, monkeypatch
):
    candidates = []
    for parent, method in (("runs_a", "rtn"), ("runs_b", "smoothquant")):
        out = tmp_path / parent / "w4"
        args = ["quantize", "--checkpoint", str(float_path), "--calib", str(buffer_file), "--out", str(out)]
        assert main([*args, "--method", method]) == 0
        candidates += ["--candidate", str(out)]
    report = tmp_path / "report"
    args = ["fidelity", "--reference", str(float_path), "--buffer", str(buffer_file), "--out", str(report)]
    assert main([*args, *candidates]) == 0
    err = capsys.readouterr().err
    assert "fidelity runs_a__w4" in err and "fidelity runs_b__w4" in err
    summary = (report / "summary.md").read_text()
    assert "| runs_a__w4 | rtn |" in summary and "| runs_b__w4 | smoothquant |" in summary
    assert (report / "sqnr_comparison.png").stat().st_size > 1000
    assert (report / "runs_b__w4_layer_sqnr.png").stat().st_size > 1000

    real = fidelity_module.fidelity
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise QuantVLAError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(fidelity_module, "fidelity", second_fails)
    assert main([*args, *candidates, "--overwrite"]) == 2
    assert json.loads((report / "runs_a__w4.json").read_text())["quant_config"]["method"] == "rtn"
    assert "runs_a__w4" in (report / "summary.md").read_text() and not (report / "runs_b__w4.json").exists()
