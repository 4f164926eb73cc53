"""RGB arrays as the method and the archive exchange them: (H, W, 3), uint8, uint16 or float in [0, 1]."""

from __future__ import annotations

import numpy as np


def unit_rgb(rgb: np.ndarray, name: str = "rgb", *, check_range: bool = True) -> np.ndarray:
    """``rgb`` as float64 in [0, 1]: uint8 divided by 255, uint16 by 65535, float kept.

    Args:
        rgb: a non-empty (H, W, 3) array of uint8, uint16 or float.
        name: how to name the array in errors.
        check_range: refuse float values outside [0, 1] (a full pass over the image).

    Raises:
        ValueError: on a wrong shape or dtype, or (``check_range``) float values outside [0, 1].
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"{name} must be a non-empty (H, W, 3) array, got {describe(rgb)}")
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if rgb.dtype == np.uint16:
        return rgb.astype(np.float64) / 65535.0
    if not np.issubdtype(rgb.dtype, np.floating):
        raise ValueError(f"{name} must be uint8, uint16 or float, got dtype {rgb.dtype}")
    if check_range:
        low, high = float(rgb.min()), float(rgb.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"{name} float values must lie in [0, 1], got range [{low}, {high}]")
    return rgb.astype(np.float64)


def describe(value: object) -> str:
    """How an unexpected argument is named in an error: an array's dtype and shape, else its type."""
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:  # a tensor
        return f"{type(value).__name__} of dtype {dtype} and shape {tuple(shape)}"
    return type(value).__name__
