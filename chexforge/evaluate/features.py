"""Feature extractors for FID/KID, precision/recall/density/coverage and memorization.

Every extractor maps a batch of grayscale images (N×S×S float32 in [0, 1]) to an N×D float32
array, and loads only from local files: nothing is downloaded, ever (HF_HUB_OFFLINE semantics).

    xrv-densenet        torchxrayvision's DenseNet-121 ("all"), 1024-d, weights already on disk
                        (loaded by chexforge/qc/models.py, as QC loads it)
    raddino=DIR         a local Hugging Face folder (RAD-DINO or any ViT/DINOv2), CLS token
    inception           the FID Inception-v3 of torch-fidelity (via torchmetrics), cached weights only
    PATH                a TorchScript file (takes N×1×S×S in [0, 1]) or a local HF model folder
    random              a fixed-seed random conv net: for tests and smoke runs, NOT a perceptual metric
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contracts.model_files import XRV_INPUT_SIZE
from ..errors import UserError
from ..qc.models import load_torchscript, load_xrv_densenet, xrv_scale, xrv_weights_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
NAMES = ("xrv-densenet", "raddino=DIR", "inception", "PATH", "random")


@dataclass
class Extractor:
    name: str
    perceptual: bool  # False: the numbers compare sets but mean nothing perceptually
    note: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # N×1×S×S [0, 1] → N×D
    batch: int = 16

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.fn(torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch]))[:, None].float())
               for i in range(0, len(images), self.batch)]
        feats = torch.cat(out).reshape(len(images), -1) if out else torch.zeros(0, 1)
        return feats.double().numpy()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x, (size, size), mode="bilinear", align_corners=False)


# ---- random -------------------------------------------------------------------------------------


class RandomConvNet(nn.Module):
    """Three random convolutions (fixed seed), ReLU, 2×2 average pooling: 256-d. Not trained."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(1, 16, 5, 2, 2), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1)])
        for c in self.convs:
            fan_in = c.in_channels * c.kernel_size[0] * c.kernel_size[1]
            c.weight.data = torch.randn(c.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
            c.bias.data.zero_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x, 128) * 2 - 1
        for c in self.convs:
            x = F.relu(c(x))
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


def random_extractor(seed: int = 0) -> Extractor:
    net = RandomConvNet(seed)
    return Extractor("random", False, "a fixed-seed random conv net: compares sets, not a perceptual metric", net)


# ---- torchxrayvision ----------------------------------------------------------------------------


def xrv_weights() -> Path | None:
    """The DenseNet's weights file when one is on this machine (`--features auto` asks)."""
    return xrv_weights_file()


def xrv_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's features2: the dense features, ReLU, global average pool (1024-d)."""
    return F.adaptive_avg_pool2d(F.relu(model.features(xrv_input(x))), 1).flatten(1)


def xrv_input(x: torch.Tensor) -> torch.Tensor:
    return xrv_scale(_resize(x, XRV_INPUT_SIZE))  # torchxrayvision's [-1024, 1024] at 224 px


def xrv_extractor() -> Extractor:
    """chexforge/qc/models.py's one loader (a state dict; never torchxrayvision's code)."""
    model = load_xrv_densenet()
    return Extractor("xrv-densenet", True, f"torchxrayvision DenseNet-121 'all', 1024-d ({xrv_weights_file()})",
                     lambda x: xrv_features(model, x))


# ---- Hugging Face folders (RAD-DINO) ------------------------------------------------------------


def hf_extractor(folder: str | Path, name: str) -> Extractor:
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError("not a local Hugging Face model folder (no config.json); "
                        "download it once elsewhere (e.g. microsoft/rad-dino) and give its path", folder)
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError(f"{name} needs the transformers package") from None
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    mean, std, size = [0.5] * 3, [0.5] * 3, 224
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        from ..contracts.limits import read_json

        cfg = read_json(pp, "preprocessor_config.json")
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        crop = cfg.get("crop_size") or cfg.get("size") or {}
        size = int(crop.get("height", crop.get("shortest_edge", size)) if isinstance(crop, dict) else crop)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=(_resize(x, size).repeat(1, 3, 1, 1) - m) / s)
        return out.last_hidden_state[:, 0] if getattr(out, "last_hidden_state", None) is not None else out.pooler_output

    return Extractor(name, True, f"{folder.name} (local Hugging Face folder), CLS token", fn, batch=8)


# ---- inception ----------------------------------------------------------------------------------


def inception_extractor() -> Extractor:
    where = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not where.is_file():
        raise UserError(f"the FID Inception weights are not on disk: put {INCEPTION_FILE} (torch-fidelity's release) "
                        f"in {where.parent} (chexforge never downloads)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise UserError("inception needs torch-fidelity (pip install torch-fidelity)") from None
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(where))
    return Extractor("inception", True, "FID Inception-v3 (torch-fidelity), 2048-d pool features",
                     lambda x: net((_resize(x, 299).repeat(1, 3, 1, 1) * 255).to(torch.uint8)))


# ---- a user's file ------------------------------------------------------------------------------


def path_extractor(path: Path) -> Extractor:
    if path.is_dir():
        return hf_extractor(path, str(path))
    net = load_torchscript(path, "--features")

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = net(x)
        return y.flatten(2).mean(-1) if y.dim() > 2 else y

    return Extractor(path.name, True, f"TorchScript {path} (input N×1×S×S in [0, 1])", fn)


def get_extractor(spec: str) -> Extractor:
    """`xrv-densenet`, `raddino=DIR`, `inception`, `random`, or a path (TorchScript file, HF folder)."""
    if spec == "random":
        return random_extractor()
    if spec == "xrv-densenet":
        return xrv_extractor()
    if spec == "inception":
        return inception_extractor()
    if spec.startswith("raddino"):
        _, _, folder = spec.partition("=")
        if not folder:
            raise UserError("--features raddino needs the local model folder: --features raddino=/path/to/rad-dino")
        return hf_extractor(folder, "raddino")
    if Path(spec).expanduser().exists():
        return path_extractor(Path(spec).expanduser())
    raise UserError(f"--features: unknown extractor {spec!r}; expected one of {', '.join(NAMES)} (a PATH must exist)")
