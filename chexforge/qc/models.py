"""Image classifiers that QC rules run: torchxrayvision's DenseNet or a local TorchScript file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contracts.model_files import XRV_MODELS, XRV_WEIGHTS
from ..errors import UserError


class Classifier:
    """A loaded image classifier: images (N, H, W) in [0, 1] → probabilities (N, K) by label."""

    def __init__(self, spec: str, path: Path, device: str):
        import torch

        self.torch, self.device = torch, device
        self.xrv = spec in XRV_MODELS
        if spec in XRV_MODELS:
            try:
                import torchxrayvision as xrv
            except Exception as e:  # noqa: BLE001 - a broken install is bad input, one line
                raise UserError(f"qc model {spec}: torchxrayvision cannot be imported ({type(e).__name__}: {e})") from None
            # The weights file is already in xrv's cache (checked before), so this loads it and downloads nothing.
            self.net = xrv.models.DenseNet(weights=XRV_WEIGHTS[spec])
            self.labels = [str(p) for p in self.net.pathologies]
        else:
            try:
                self.net = torch.jit.load(str(path), map_location=device)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"cannot load the TorchScript qc model ({type(e).__name__}: {e})", path) from None
            self.labels = [str(p) for p in getattr(self.net, "pathologies", [])]
        self.net = self.net.to(device).eval()

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.stack(images)[:, None].astype(np.float32)).to(self.device)
            # TorchScript models take [0, 1] at their `input_size` (as `chexforge eval` feeds them);
            # torchxrayvision's DenseNet its own range [-1024, 1024] at 224 px.
            size = 224 if self.xrv else int(getattr(self.net, "input_size", 224))
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            y = self.net(x * 2048.0 - 1024.0 if self.xrv else x)
            y = y.float().reshape(len(images), -1).cpu().numpy()
        if y.min() < 0 or y.max() > 1:  # logits
            y = 1.0 / (1.0 + np.exp(-y))
        return y
