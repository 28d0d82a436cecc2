"""The model loaders, one per model kind, and the classifier that QC rules run.

QC here and `chexforge eval` (features, adherence) load every model through these two:

- `load_xrv_densenet`: torchxrayvision's DenseNet-121 "all" (`xrv-densenet`). The network is
  torchvision's DenseNet-121 with a one-channel stem and 18 outputs: the same parameter names
  and the same arithmetic as torchxrayvision's class, so its state dict loads strictly. The
  weights are read with `torch.load(weights_only=True)`; torchxrayvision is never imported
  (chexforge installs it --no-deps, for its label files). Its released file is a pickled whole
  model, which only an unsafe load can read: the error says how to convert it once.
- `load_torchscript`: a local TorchScript file, with one error handling for every flag and rule.

torch is imported inside the functions, so the QC rules import this module without it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts.model_files import (
    SEG_CLASSES_NEEDED,
    XRV_INPUT_SIZE,
    XRV_LABELS,
    XRV_MODELS,
    XRV_OP_THRESHS,
    model_file,
    xrv_files,
    xrv_missing,
)
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..errors import UserError


def _first_line(e: BaseException, limit: int = 160) -> str:
    msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:limit]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ---- TorchScript --------------------------------------------------------------------------------


def load_torchscript(path: str | Path, what: str, device: str = "cpu") -> Any:
    """A local TorchScript file, in eval mode on `device`; a missing or bad file is one UserError
    line starting with `what` (the flag or rule that named it)."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: no such model file (expected a local TorchScript file)", path)
    try:
        with warnings.catch_warnings():  # torch's deprecation notice of torch.jit is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # noqa: BLE001 - any load failure is bad input, one line
        raise UserError(f"{what}: not a loadable TorchScript file ({_first_line(e)})", path) from None
    return net.eval()


# ---- `chexforge eval`'s TorchScript convention ----------------------------------------------------
#
# Every model takes a float32 batch (N, 1, S, S) in [0, 1], S = the module's `input_size` attribute
# when it has one (an int), else 224; images are resized bilinearly. Outputs:
#   sex:  (N, 2) logits for (female, male); P(female) = softmax(...)[:, 0]
#   age:  (N,) or (N, 1) predicted age in years
#   seg:  (N, C, h, w) mask logits (inside where > 0), with `classes` (C names) as an attribute
#   det:  (N, K, 5) rows (x0, y0, x1, y1, class index), corners normalised to [0, 1]; rows whose
#         class index is < 0 are padding; `classes` (names by index) as an attribute

DEFAULT_INPUT = 224


class ScriptModel:
    """A local TorchScript file in `chexforge eval`'s convention (above), loaded by
    `load_torchscript` (a missing or bad file is a UserError naming the flag or rule); the
    `mask_dice` QC rule and `chexforge eval`'s adherence models use it."""

    device = "cpu"

    def __init__(self, path: str | Path, flag: str, needs_classes: bool = False, device: str = "cpu"):
        self.path, self.flag, self.device = Path(path).expanduser(), flag, device
        self.net = load_torchscript(self.path, flag, device)
        size = getattr(self.net, "input_size", DEFAULT_INPUT)
        if not isinstance(size, int) or size < 8:
            raise UserError(f"{flag}: the model's input_size attribute must be an int ≥ 8, not {size!r}", self.path)
        self.size = size
        self.classes: list[str] = []
        if needs_classes:
            classes = getattr(self.net, "classes", None)
            if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
                raise UserError(f"{flag}: {SEG_CLASSES_NEEDED}", self.path)
            self.classes = list(classes)

    def bad(self, why: str) -> UserError:
        return UserError(f"{self.flag}: {why}", self.path)

    def __call__(self, images: np.ndarray, batch: int = 16) -> list[Any]:
        """Images (N, H, W) in [0, 1] → the model's outputs (CPU float tensors), batch by batch."""
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))[:, None].float().to(self.device)
                if x.shape[-1] != self.size or x.shape[-2] != self.size:
                    x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                        align_corners=False)
                try:
                    y = self.net(x)
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    raise self.bad(f"the model failed on a ({', '.join(map(str, x.shape))}) batch "
                                   f"({type(e).__name__}: {msg})") from None
                if not isinstance(y, torch.Tensor):
                    raise self.bad(f"the model must return a tensor, not {type(y).__name__}")
                outs.append(y.detach().float().cpu())
        return outs


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|) of two boolean masks; 1 when both are empty."""
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


# ---- torchxrayvision's DenseNet-121 -------------------------------------------------------------


def xrv_densenet_architecture() -> Any:
    """torchxrayvision's DenseNet-121 (untrained): torchvision's, one-channel stem, 18 outputs."""
    from torch import nn
    from torchvision.models import densenet121

    model = densenet121(weights=None, num_classes=len(XRV_LABELS))
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def xrv_weights_file(spec: str = "xrv-densenet") -> Path | None:
    """The weights file `load_xrv_densenet` reads, or None when none is on this machine."""
    path = model_file(spec, None)
    return path if path.is_file() else None


def load_xrv_densenet(device: str = "cpu", spec: str = "xrv-densenet") -> Any:
    """The DenseNet filled from the local state dict, in eval mode, with `pathologies` (its
    output order); nothing is downloaded, nothing is unpickled beyond tensors."""
    import pickle

    import torch

    path = xrv_weights_file(spec)
    if path is None:
        raise UserError(xrv_missing(spec))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # a damaged pickle, not a refused one
            raise UserError(f"not a PyTorch weights file ({_first_line(e)})", path) from None
        # weights_only refused a class: torchxrayvision's released file is a pickled whole model.
        raise UserError(
            f"a pickled model ({found.group(1)}), not a state dict; chexforge reads weights only (torch.load "
            f"weights_only=True). Convert it once where `import torchxrayvision` works (pip install torchxrayvision): "
            f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False).state_dict(), "
            f"'{xrv_files(spec)[0]}')\"", path) from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is bad input, one line
        raise UserError(f"not a PyTorch weights file ({_first_line(e)})", path) from None
    if not isinstance(state, dict):
        raise UserError(f"not a state dict (a {type(state).__name__})", path)
    # torchxrayvision keeps its operating points as a buffer once its loader set them; they are data here.
    state = {k: v for k, v in state.items() if k not in ("op_threshs", "upsample")}
    model = xrv_densenet_architecture()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        problems = [x.strip() for x in str(e).splitlines()[1:] if x.strip()] or [str(e)]
        raise UserError(f"not torchxrayvision DenseNet-121 weights ({problems[0][:160]})", path) from None
    model.pathologies = list(XRV_LABELS)
    return model.to(device).eval()


def xrv_scale(x: Any) -> Any:
    """Images in [0, 1] → torchxrayvision's [-1024, 1024]."""
    return x * 2048.0 - 1024.0


def op_norm(p: np.ndarray, threshs: tuple[float, ...] = XRV_OP_THRESHS) -> np.ndarray:
    """torchxrayvision's `op_norm`: sigmoid outputs (N, K) mapped piecewise linearly so each
    label's operating point becomes 0.5 (0 → 0, 1 → 1); a NaN threshold gives 0.5."""
    t = np.broadcast_to(np.asarray(threshs, np.float64), p.shape)
    p = np.asarray(p, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(p < t, p / (t * 2), 1.0 - (1.0 - p) / ((1.0 - t) * 2))
    return np.where(np.isnan(t), 0.5, out)


# ---- the QC classifier --------------------------------------------------------------------------


class Classifier:
    """A loaded image classifier: images (N, H, W) in [0, 1] → probabilities (N, K) by label."""

    def __init__(self, spec: str, path: Path, device: str):
        import torch

        self.torch, self.device, self.path = torch, device, path
        self.xrv = spec in XRV_MODELS
        if self.xrv:
            self.net = load_xrv_densenet(device, spec)
            self.labels = list(XRV_LABELS)
        else:
            self.net = load_torchscript(path, "qc model", device)
            names = getattr(self.net, "pathologies", None)
            self.labels = [names] if isinstance(names, str) else [str(p) for p in names or []]

    @property
    def findings(self) -> list[str]:
        """The labels that are chexforge findings (what a `classifier` rule can read)."""
        return [x for x in self.labels if x in FINDING_NAMES and x != NO_FINDING]

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.stack(images)[:, None].astype(np.float32)).to(self.device)
            # TorchScript models take [0, 1] at their `input_size` (as `chexforge eval` feeds them);
            # torchxrayvision's DenseNet its own range [-1024, 1024] at 224 px, and its outputs are
            # its forward's: sigmoid, then the operating-point normalisation (0.5 = its threshold).
            size = XRV_INPUT_SIZE if self.xrv else int(getattr(self.net, "input_size", 224))
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            y = self.net(xrv_scale(x) if self.xrv else x)
            y = y.float().reshape(len(images), -1).cpu().numpy()
        if self.xrv:
            return op_norm(1.0 / (1.0 + np.exp(-y.astype(np.float64))))
        if self.labels and y.shape[1] != len(self.labels):  # never read one label's output as another's
            raise UserError(f"qc model: returns {y.shape[1]} values per image but its `pathologies` attribute "
                            f"names {len(self.labels)} labels", self.path)
        if y.min() < 0 or y.max() > 1:  # logits
            y = 1.0 / (1.0 + np.exp(-y))
        return y
