"""Torch device and dtype choice; a small cupy/scipy.ndimage shim for the few ops torch lacks."""

from __future__ import annotations

import os

import numpy as np
import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: an explicit choice, else ``$NAPARI_WARP_DEVICE``, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    env = os.environ.get("NAPARI_WARP_DEVICE")
    if env:
        return torch.device(env)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_tensor(
    array, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """numpy/array-like -> float tensor on ``device`` (no copy when already there)."""
    if isinstance(array, torch.Tensor):
        return array.to(device=get_device(device) if device is not None else array.device, dtype=dtype)
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=get_device(device))


def to_numpy(tensor) -> np.ndarray:
    """Tensor (any device, with or without grad) -> numpy array."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def ndimage(device: torch.device | str | None = None):
    """scipy.ndimage, or cupyx.scipy.ndimage for CUDA devices when cupy is installed."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            import cupyx.scipy.ndimage as cnd  # type: ignore[import-not-found]

            return cnd
        except ImportError:
            pass
    import scipy.ndimage as snd

    return snd
