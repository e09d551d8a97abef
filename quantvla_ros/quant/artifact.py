"""Quantized artifacts: a checkpoint folder that loads without the float checkpoint.

    model.safetensors     packed int4/int8 weights with their scales (and input-transform
                          tensors) under each quantized module's name; every other tensor as in
                          the float checkpoint, α and β already folded into the float weights
    quant_config.json     method, bits, layout, per-module settings, α per head and β per layer
                          for the record, calibration provenance, package version, the
                          SHA-256 of model.safetensors and a SHA-256 over this file's own
                          contents (either mismatch refuses to load: the weights were made from
                          these settings, so an edited file would load to no effect)
    config.json, tokenizer, normalization statistics   copied from the float checkpoint

Because the rest of the folder is the float checkpoint's own layout (openpi or LeRobot),
`read_checkpoint` reads an artifact like any checkpoint; only the module swap before loading
differs. The folder is written beside its destination and renamed into place, and it replaces
only an earlier artifact, never another folder (quantvla_ros/outputs.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantvla_ros.atomic import atomic_dir, atomic_path, write_json_atomic
from quantvla_ros.models.common.checkpoint import CheckpointError, CheckpointInfo
from quantvla_ros.models.family import ModelFamily
from quantvla_ros.models.registry import family_of, load_model
from quantvla_ros.models.stages import StagedModel
from quantvla_ros.outputs import OutputKind, check_output_folder
from quantvla_ros.quant.api import QuantRecord
from quantvla_ros.quant.convert import set_module
from quantvla_ros.quant.fused import QuantLinearPart, member_names
from quantvla_ros.quant.linear import QuantLinear

# /2 added fused layers (a QuantLinear with split_sizes under "parent.a+b+c") and a SHA-256 over
# quant_config.json's own contents. /1 artifacts have no fused layers and load as they are, but
# an edit of their quant_config.json cannot be detected.
ARTIFACT_FORMAT = "quantvla-artifact/2"
UNVERIFIED_FORMAT = "quantvla-artifact/1"
READABLE_FORMATS = (UNVERIFIED_FORMAT, ARTIFACT_FORMAT)
QUANT_CONFIG = "quant_config.json"
CONFIG_SHA256 = "quant_config_sha256"
WEIGHTS = "model.safetensors"


def package_version() -> str:
    try:
        return version("quantvla_ros")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(quant_config: dict) -> str:
    """SHA-256 of the canonical JSON of everything in quant_config.json but this hash itself: the
    method, bits, layout, per-module specs, α and β, provenance and the weights' own SHA-256. The
    weights were made from exactly these settings, so an edit of any of them is refused, not
    loaded to no effect."""
    body = {k: v for k, v in quant_config.items() if k != CONFIG_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_artifact(path: Path | str) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


ARTIFACT_OUTPUT = OutputKind("a quantized artifact", is_artifact)


def _copy_checkpoint_files(family: ModelFamily, src: Path, dst: Path) -> None:
    """Everything of the float checkpoint folder except its weights, at the same relative paths."""
    for pattern in family.side_files:
        for f in src.glob(pattern):
            if f.is_file():
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst / f.relative_to(src))


def save_artifact(
    model: StagedModel,
    source: CheckpointInfo,
    record: QuantRecord,
    out_dir: Path | str,
    calibration: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the artifact folder beside `out_dir` and move it into place in one rename; an earlier
    artifact there is replaced only with `overwrite`, and any other non-empty folder is refused."""
    out_dir = Path(out_dir).resolve()
    check_output_folder(out_dir, "Artifact folder", ARTIFACT_OUTPUT, overwrite)
    family = family_of(model)
    with atomic_dir(out_dir) as staging:
        staging.mkdir()
        _copy_checkpoint_files(family, source.path, staging)
        with atomic_path(staging / WEIGHTS) as tmp:
            save_file(family.export_state_dict(model, source.layout), str(tmp), metadata={"format": "pt"})
        quant_config = {
            "format": ARTIFACT_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": package_version(),
            **record.config.to_json(),
            "modules": record.modules,
            "atm_ohb": None if record.atm_ohb is None else record.atm_ohb.to_json(),
            "calibration": calibration or {},
            "source_checkpoint": {"path": str(source.path), "layout": source.layout, "asset_id": source.asset_id},
            "weight_bytes": weight_bytes(model, list(record.modules)),
            "model_safetensors_sha256": sha256_file(staging / WEIGHTS),
        }
        # Hashed as it will be read back: JSON turns tuples into lists.
        quant_config = json.loads(json.dumps(quant_config))
        quant_config[CONFIG_SHA256] = config_sha256(quant_config)
        write_json_atomic(staging / QUANT_CONFIG, quant_config)
    return out_dir


def weight_bytes(model: StagedModel, names: list[str]) -> dict:
    """Bytes of the quantized modules as stored, against the same modules in bf16."""
    quantized = sum(model.get_submodule(n).weight_bytes() for n in names)
    bf16 = sum(2 * model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
    return {"modules": len(names), "bf16": bf16, "quantized": quantized, "ratio": quantized / bf16 if bf16 else None}


def read_quant_config(path: Path) -> dict:
    file = path / QUANT_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}); re-run `quantvla quantize`.") from None
    if not isinstance(cfg, dict) or cfg.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{file} is not a quant config this version reads ({', '.join(READABLE_FORMATS)}); "
            "re-run `quantvla quantize` with this version."
        )
    if cfg["format"] == ARTIFACT_FORMAT and cfg.get(CONFIG_SHA256) != config_sha256(cfg):
        raise CheckpointError(
            f"{file} was edited after `quantvla quantize` wrote it (it no longer matches its {CONFIG_SHA256}), "
            "and the weights still follow the original settings; restore the file or quantize again with the "
            "settings you want."
        )
    return cfg


def verify_weights(path: Path, quant_config: dict) -> None:
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"Artifact {path} has no {WEIGHTS}; re-run `quantvla quantize`.")
    if sha256_file(weights) != quant_config.get("model_safetensors_sha256"):
        raise CheckpointError(
            f"{weights} does not match the SHA-256 recorded in {QUANT_CONFIG}: the artifact is corrupted or "
            "truncated; copy it again or re-run `quantvla quantize`."
        )


def load_artifact(
    path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[StagedModel, CheckpointInfo, ModelFamily, dict]:
    path = Path(path)
    quant_config = read_quant_config(path)
    verify_weights(path, quant_config)
    modules = quant_config.get("modules", {})

    def swap_in_quant_linears(model: StagedModel) -> None:
        for name, spec in modules.items():
            layer = QuantLinear.from_spec(spec)
            set_module(model, name, layer)
            if layer.split_sizes is not None:
                for index, member in enumerate(member_names(name)):
                    set_module(model, member, QuantLinearPart(layer, index))

    asset_id = quant_config.get("source_checkpoint", {}).get("asset_id")
    model, info, family = load_model(path, device, dtype, asset_id, adapt=swap_in_quant_linears)
    return model, info, family, quant_config
