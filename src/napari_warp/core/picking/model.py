"""BoxNet: the paper's residual U-Net that segments a micrograph at 8 Å/px into background, particle and artifact.

Architecture (Online Methods, "Particle picking with a residual neural net"): a 5×5 convolution, a contracting path
of 5 groups × 5 ResNet blocks (each group but the first starts by down-sampling ×2 and doubling the channels) down
to 1/16 of the input, an expanding path of 4 groups × 2 ResNet blocks (up-sampling ×2, concatenation with the mirror
group's output, U-Net style), 2 final ResNet blocks and a 1×1 projection onto the 3 classes. The paper's base width
is 32 channels; the shipped model is narrower (``width``) to stay small and fast on CPUs.

Model files are ``torch.save`` dictionaries (weights stored as float16, loaded with ``weights_only=True``) that
carry the name, version and a record of what the model was trained on, so results can name the exact model.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CLASSES = ("background", "particle", "artifact")
MODEL_PIXEL_SIZE = 8.0  # Å/px: micrographs are rescaled to this sampling before segmentation
FILE_FORMAT = "napari-warp-boxnet/1"
GENERIC_MODEL = Path(__file__).with_name("models") / "boxnet-generic.pt"


class ResBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class BoxNet(nn.Module):
    """``(B, 1, H, W)`` normalised images → ``(B, 3, H, W)`` class logits; H and W multiples of 16.

    width: channels after the first convolution (paper: 32); depth: ResNet blocks per contracting group (paper: 5).
    """

    def __init__(self, width: int = 8, depth: int = 5, groups: int = 5, up_depth: int = 2):
        super().__init__()
        self.config = {"width": width, "depth": depth, "groups": groups, "up_depth": up_depth}
        chans = [width * 2**g for g in range(groups)]
        self.stem = nn.Sequential(nn.Conv2d(1, width, 5, padding=2, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.down = nn.ModuleList()
        for g, c in enumerate(chans):
            c_prev = chans[max(g - 1, 0)]
            blocks = [ResBlock(c_prev, c, stride=1 if g == 0 else 2)] + [ResBlock(c, c) for _ in range(depth - 1)]
            self.down.append(nn.Sequential(*blocks))
        self.up = nn.ModuleList()
        for g in range(groups - 2, -1, -1):  # mirror groups 3, 2, 1, 0
            c_in = chans[g + 1] + chans[g]
            blocks = [ResBlock(c_in, chans[g])] + [ResBlock(chans[g], chans[g]) for _ in range(up_depth - 1)]
            self.up.append(nn.Sequential(*blocks))
        self.final = nn.Sequential(ResBlock(width, width), ResBlock(width, width))
        self.head = nn.Conv2d(width, len(CLASSES), 1)

    @property
    def factor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (self.config["groups"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.stem(x)
        for group in self.down:
            x = group(x)
            skips.append(x)
        for group, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = group(torch.cat([x, skip], dim=1))
        return self.head(self.final(x))


@dataclass
class PickingModel:
    """A BoxNet with its identity: ``name``, ``version``, ``digest`` (of its weights), ``trained_on`` (free text and
    figures recorded by the training command) and the sampling it expects (``pixel_size``, Å/px)."""

    net: BoxNet
    name: str = "untrained"
    version: str = "0"
    trained_on: dict = field(default_factory=dict)
    pixel_size: float = MODEL_PIXEL_SIZE
    path: Path | None = None

    @property
    def digest(self) -> str:
        """Short SHA-256 of the weights: two models with the same name but other weights never look alike."""
        h = hashlib.sha256()
        for key, value in sorted(self.net.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu", torch.float16).numpy().tobytes())
        return h.hexdigest()[:12]

    @property
    def label(self) -> str:
        """``name vversion (digest)``, stored with every result."""
        return f"{self.name} v{self.version} ({self.digest})"


def model_file_id(path: str | os.PathLike | None = None) -> str:
    """``name:sha256[:16]`` of a model file (None/'': the generic model), cached by size and mtime: what makes a
    session's picking step outdated when the model changes."""
    p = Path(path) if path else GENERIC_MODEL
    try:
        st = p.stat()
    except FileNotFoundError:
        return f"missing:{p}"
    return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def save_model(model: PickingModel, path: str | os.PathLike) -> Path:
    """Write ``model`` (float16 weights + identity) atomically; returns the path."""
    from ..io.atomic import atomic_path

    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
             for k, v in model.net.state_dict().items()}
    payload = {"format": FILE_FORMAT, "name": model.name, "version": str(model.version),
               "config": dict(model.net.config), "pixel_size": float(model.pixel_size),
               "trained_on": model.trained_on, "state": state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model(path: str | os.PathLike | None = None, device=None) -> PickingModel:
    """Read a BoxNet model file; ``None`` gives the generic model shipped with the package. Eval mode, float32."""
    path = Path(path) if path is not None else GENERIC_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no BoxNet model file there")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: say which file and what was expected
        raise ValueError(f"{path}: not a readable BoxNet model file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not a napari-warp BoxNet model (expected format {FILE_FORMAT!r})")
    net = BoxNet(**payload["config"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state"].items()})
    net.eval()
    if device is not None:
        net.to(device)
    return PickingModel(net=net, name=payload["name"], version=payload["version"],
                        trained_on=payload.get("trained_on", {}), pixel_size=payload.get("pixel_size", 8.0),
                        path=path)
