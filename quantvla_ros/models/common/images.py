"""Camera images as every family's vision tower takes them: uint8 pixels to [-1, 1], cameras stacked."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantvla_ros.errors import QuantVLAError


def image_to_model(image: np.ndarray) -> np.ndarray:
    """Map uint8 [0, 255] pixels to the float32 [-1, 1] range SigLIP expects."""
    if image.dtype != np.uint8:
        raise QuantVLAError(f"image_to_model needs a uint8 image, got dtype {image.dtype}; pass 8-bit pixels.")
    # The same float32 operations as openpi's Observation.from_dict, so results match bit for bit.
    return image.astype(np.float32) / 255.0 * 2.0 - 1.0


def stack_cameras(
    camera_names: tuple[str, ...],
    images: dict[str, np.ndarray],
    size: int,
    to_model: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, list[bool]]:
    """Each camera through `to_model` (uint8 H×W×3 -> float32 3×size×size in [-1, 1]), in the
    model's order; a camera the observation lacks is a -1 image whose mask attention honours."""
    out, masks = [], []
    for name in camera_names:
        present = name in images
        out.append(to_model(images[name]) if present else np.full((3, size, size), -1.0, dtype=np.float32))
        masks.append(present)
    return np.stack(out), masks
