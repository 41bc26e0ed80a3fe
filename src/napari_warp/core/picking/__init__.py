"""BoxNet particle picking: the model, tiled inference into picks and artifact masks, and (re)training."""

from .infer import BoxNetSettings, Picks, apply_threshold, calibrate_threshold, pick
from .model import BoxNet, PickingModel, load_model, save_model

__all__ = ["BoxNet", "BoxNetSettings", "PickingModel", "Picks", "apply_threshold", "calibrate_threshold", "load_model",
           "pick", "save_model"]
