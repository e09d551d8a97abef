import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.images import image_to_model
from quantvla_ros.models.common.normalizer import (
    Normalizer,
    NormStats,
    load_lerobot_norm_stats,
    pad_to_dim,
    save_lerobot_norm_stats,
)
from quantvla_ros.models.pi0.checkpoint import load_openpi_norm_stats, save_openpi_norm_stats
from quantvla_ros.models.pi0.processor import discretize_state, resize_with_pad
from quantvla_ros.models.smolvla.processor import resize_with_pad_top_left

pytestmark = pytest.mark.unit


def make_stats(dim: int = 4, seed: int = 0) -> NormStats:
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-30, 30, dim)
    std = rng.uniform(0.5, 10, dim)
    return NormStats(mean=mean, std=std, q01=mean - 2.3 * std, q99=mean + 2.3 * std)


def assert_stats_equal(a: NormStats, b: NormStats) -> None:
    for name in ("mean", "std", "q01", "q99"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


# --- images -------------------------------------------------------------------------------------


def test_resize_with_pad_wide_image_gets_centred_black_rows():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[:, :100] = (200, 10, 30)  # left half
    img[:, 100:] = (5, 100, 250)  # right half
    out = resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 200 px wide -> 224 wide, so 100 rows -> 112 rows, with (224 - 112) / 2 = 56 black rows each side.
    assert not out[:56].any() and not out[168:].any()
    np.testing.assert_array_equal(out[56:168, :100], np.broadcast_to([200, 10, 30], (112, 100, 3)))
    np.testing.assert_array_equal(out[56:168, 124:], np.broadcast_to([5, 100, 250], (112, 100, 3)))


def test_resize_with_pad_tall_image_pads_columns_with_odd_pixel_right():
    img = np.full((8, 3, 3), 77, dtype=np.uint8)
    out = resize_with_pad(img, 8, 8)
    # Height already fits: no scaling, 5 columns of padding, 2 left and 3 right as in openpi.
    assert not out[:, :2].any() and not out[:, 5:].any()
    assert (out[:, 2:5] == 77).all()


def test_resize_with_pad_matches_antialiased_bilinear():
    # openpi resizes with jax.image.resize (antialiased when shrinking); torch's antialiased bilinear is
    # the same filter, so we stay within one grey level of it.
    img = np.random.default_rng(0).integers(0, 256, (120, 240, 3), dtype=np.uint8)
    out = resize_with_pad(img, 224, 224)
    ref = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(112, 224), mode="bilinear", antialias=True
    )
    ref = ref.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    assert np.abs(out[56:168].astype(np.int32) - ref.astype(np.int32)).max() <= 1


@pytest.mark.parametrize("shape", [(1, 300, 3), (300, 1, 3), (2, 1000, 3)])
def test_resize_with_pad_extreme_aspect_ratio_keeps_a_one_pixel_line(shape):
    # Past 64:1 at 224 (here 300:1 and 500:1) the scaled side used to truncate to 0 pixels.
    out = resize_with_pad(np.full(shape, 200, dtype=np.uint8), 224, 224)
    assert out.shape == (224, 224, 3) and (out == 200).any()
    # SmolVLA's top-left padding at 512 had the same truncation.
    out = resize_with_pad_top_left(np.full(shape, 200, dtype=np.uint8), 512)
    assert out.shape == (3, 512, 512) and (out > 0.7).any()


def test_resize_with_pad_same_size_is_a_copy():
    img = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out = resize_with_pad(img, 32, 48)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, img)


@pytest.mark.parametrize(
    "img, needle",
    [
        (np.zeros((10, 10), dtype=np.uint8), "(10, 10)"),
        (np.zeros((10, 10, 4), dtype=np.uint8), "(10, 10, 4)"),
        (np.zeros((10, 10, 3), dtype=np.float32), "float32"),
    ],
)
def test_resize_with_pad_rejects_non_rgb_uint8(img, needle):
    with pytest.raises(ValueError, match="uint8 H×W×3") as err:
        resize_with_pad(img, 8, 8)
    assert needle in str(err.value)


def test_image_to_model_maps_to_minus_one_one():
    out = image_to_model(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, 1.0, -0.6]]], atol=1e-6)
    with pytest.raises(ValueError, match="float64"):
        image_to_model(np.zeros((2, 2, 3)))


# --- normalization ------------------------------------------------------------------------------


def test_norm_stats_are_read_only_float32():
    s = NormStats(mean=[1, 2], std=np.array([3.0, 4.0]))
    assert s.mean.dtype == np.float32 and s.q01 is None
    with pytest.raises(ValueError):
        s.mean[0] = 5


def test_mean_std_matches_openpi_formula_and_round_trips():
    stats = make_stats()
    x = np.random.default_rng(2).normal(0, 20, (10, 4)).astype(np.float32)
    norm = Normalizer(stats, mode="mean_std")
    y = norm.normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    expected = (x.astype(np.float64) - stats.mean) / (stats.std.astype(np.float64) + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(y), x, rtol=1e-6, atol=1e-5)


def test_quantiles_maps_q01_q99_to_minus_one_one_and_round_trips():
    stats = make_stats()
    norm = Normalizer(stats, mode="quantiles")
    np.testing.assert_allclose(norm.normalize(stats.q01), -1.0, atol=1e-6)
    np.testing.assert_allclose(norm.normalize(stats.q99), 1.0, atol=1e-6)
    x = np.random.default_rng(3).normal(0, 20, (5, 4)).astype(np.float32)
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(x)), x, rtol=1e-6, atol=1e-5)
    y = np.linspace(-1.5, 1.5, 20, dtype=np.float32).reshape(5, 4)
    np.testing.assert_allclose(norm.normalize(norm.unnormalize(y)), y, atol=1e-6)


def test_eps_is_configurable():
    stats = NormStats(mean=[1.0], std=[0.0], q01=[2.0], q99=[2.0])
    assert Normalizer(stats, "mean_std", eps=1e-6).normalize(np.array([1.5]))[0] == pytest.approx(5e5)
    assert Normalizer(stats, "mean_std", eps=1e-8).normalize(np.array([1.5]))[0] == pytest.approx(5e7)
    assert Normalizer(stats, "quantiles", eps=1e-8).normalize(np.array([2.0]))[0] == pytest.approx(-1.0)


@pytest.mark.parametrize("mode", ["mean_std", "quantiles"])
def test_dims_beyond_the_stats_pass_through(mode):
    norm = Normalizer(make_stats(dim=3), mode=mode)
    x = np.array([[10.0, -4.0, 7.0, 0.25, -3.5]], dtype=np.float32)
    y = norm.normalize(x)
    np.testing.assert_array_equal(y[:, 3:], x[:, 3:])
    assert not np.allclose(y[:, :3], x[:, :3])
    np.testing.assert_array_equal(norm.unnormalize(y)[:, 3:], x[:, 3:])


def test_stats_longer_than_the_vector_use_their_leading_dims():
    stats = make_stats(dim=5)
    x = np.array([1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(
        Normalizer(stats, "mean_std").normalize(x), (x - stats.mean[:2]) / (stats.std[:2] + 1e-6), rtol=1e-6
    )


def test_missing_stats_and_unknown_mode_are_clear_errors():
    with pytest.raises(ValueError, match="q01 and q99"):
        Normalizer(NormStats(mean=[0.0], std=[1.0]), mode="quantiles")
    with pytest.raises(ValueError, match="mean and std"):
        Normalizer(NormStats(q01=[0.0], q99=[1.0]), mode="mean_std")
    with pytest.raises(ValueError, match="'min_max'"):
        Normalizer(make_stats(), mode="min_max")
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        Normalizer(NormStats(mean=[0.0, 0.0], std=[1.0, 1.0, 1.0]), mode="mean_std")


def test_pad_to_dim():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = pad_to_dim(x, 5)
    assert out.shape == (2, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :3], x)
    assert not out[:, 3:].any()
    with pytest.raises(ValueError, match="length 3 to 2"):
        pad_to_dim(x, 2)


def test_discretize_state_boundaries():
    x = np.array([-1.0, -1.0 + 2 / 256, 0.0, 0.999, 1.0, 1.5, -1.5])
    # Out-of-range values are not clipped below -1, exactly like openpi.
    np.testing.assert_array_equal(discretize_state(x), [0, 1, 128, 255, 255, 255, -1])
    assert np.issubdtype(discretize_state(x).dtype, np.integer)
    np.testing.assert_array_equal(discretize_state(np.array([0.0, 0.99]), bins=4), [2, 3])


# --- stats files --------------------------------------------------------------------------------


def test_openpi_stats_round_trip(tmp_path):
    stats = {"state": make_stats(6, seed=1), "actions": NormStats(mean=[0.5, 1.0], std=[1.0, 2.0])}
    path = tmp_path / "assets" / "robot" / "norm_stats.json"
    save_openpi_norm_stats(path, stats)
    raw = json.loads(path.read_text())
    assert set(raw["norm_stats"]) == {"state", "actions"}
    assert "q01" not in raw["norm_stats"]["actions"]  # missing fields are left out, not null
    loaded = load_openpi_norm_stats(path)
    for key in stats:
        assert_stats_equal(loaded[key], stats[key])
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_openpi_loader_reads_openpi_layout_with_nulls(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(
        '{\n  "norm_stats": {\n    "state": {\n      "mean": [0.1, -0.2],\n      "std": [1.5, 2.5],\n'
        '      "q01": null,\n      "q99": null\n    }\n  }\n}'
    )
    stats = load_openpi_norm_stats(path)
    np.testing.assert_array_equal(stats["state"].mean, np.float32([0.1, -0.2]))
    assert stats["state"].q01 is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"state": {"mean": [0.0]}}', '"norm_stats"'),
        ('{"norm_stats": {"state": {"min": [0.0]}}}', 'Entry "state"'),
        ('{"norm_stats": {"state": {"mean": ["a", "b"]}}}', "non-numeric"),
        ('{"norm_stats": {"state": {"mean": [[0.0], [1.0, 2.0]]}}}', "non-numeric"),
    ],
)
def test_openpi_loader_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "norm_stats.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_openpi_norm_stats(path)
    assert str(path) in str(err.value)


def test_missing_stats_files_are_user_errors(tmp_path):
    with pytest.raises(QuantVLAError, match="nope.json"):
        load_openpi_norm_stats(tmp_path / "nope.json")
    with pytest.raises(QuantVLAError, match="nope.safetensors"):
        load_lerobot_norm_stats([tmp_path / "nope.safetensors"])


def test_lerobot_stats_round_trip_and_key_names(tmp_path):
    stats = {"state": make_stats(6), "actions": make_stats(4, seed=5), "observation.environment_state": make_stats(2)}
    path = tmp_path / "policy_preprocessor_step_2_normalizer_processor.safetensors"
    save_lerobot_norm_stats(path, stats)
    keys = set(safetensors.numpy.load_file(str(path)))
    assert {"observation.state.q01", "action.mean", "observation.environment_state.std"} <= keys
    loaded = load_lerobot_norm_stats([path])
    assert set(loaded) == set(stats)
    for key in stats:
        assert_stats_equal(loaded[key], stats[key])
    assert list(tmp_path.iterdir()) == [path]


def test_lerobot_loader_merges_files_and_ignores_other_stats(tmp_path):
    pre, post = tmp_path / "pre.safetensors", tmp_path / "post.safetensors"
    mean = np.float32([1.0, 2.0])
    safetensors.numpy.save_file(
        {"observation.state.mean": mean, "observation.state.min": mean - 5, "action.count": np.int64([9])}, str(pre)
    )
    safetensors.numpy.save_file({"action.q01": mean, "action.q99": mean + 1, "observation.state.mean": mean}, str(post))
    loaded = load_lerobot_norm_stats([pre, post])
    np.testing.assert_array_equal(loaded["state"].mean, mean)
    assert loaded["state"].q01 is None
    np.testing.assert_array_equal(loaded["actions"].q99, mean + 1)
    assert loaded["actions"].mean is None


def test_lerobot_loader_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors") as err:
        load_lerobot_norm_stats([bad])
    assert str(bad) in str(err.value)

    flat = tmp_path / "flat.safetensors"
    safetensors.numpy.save_file({"mean": np.zeros(2, np.float32)}, str(flat))
    with pytest.raises(ValueError, match='"mean"') as err:
        load_lerobot_norm_stats([flat])
    assert str(flat) in str(err.value)

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors.numpy.save_file({"action.mean": np.zeros(2, np.float32)}, str(a))
    safetensors.numpy.save_file({"action.mean": np.ones(2, np.float32)}, str(b))
    with pytest.raises(ValueError, match="disagrees") as err:
        load_lerobot_norm_stats([a, b])
    assert str(b) in str(err.value)


def test_writers_replace_existing_files(tmp_path: Path):
    path = tmp_path / "norm_stats.json"
    save_openpi_norm_stats(path, {"state": make_stats(2)})
    save_openpi_norm_stats(path, {"actions": make_stats(3)})
    assert set(load_openpi_norm_stats(path)) == {"actions"}
