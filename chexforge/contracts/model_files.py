"""Local model files that QC rules and `chexforge eval` can name, and a check that they exist.

Pure path logic and data (no torch), so recipe validation can say "the weights are not on this
machine" at the rule's line. `xrv-densenet` names torchxrayvision's DenseNet-121 "all" model,
used only when its weights are already in torchxrayvision's cache folder: chexforge never
downloads them. Any other name is a local file.

torchxrayvision releases these weights as a pickled whole model (its own loader reads them with
`torch.load(weights_only=False)`, which runs code from the file). chexforge reads only a state
dict (`weights_only=True`; chexforge/qc/models.py): the released file converted once, saved next
to it under `XRV_STATE_DICTS`'s name so torchxrayvision's own file stays usable. A released file
that was already converted in place is read as well.

A `mask_dice` segmentation model's `classes` attribute is read from the TorchScript archive's
`data.pkl` by an unpickler that resolves every class to a stub (no code from the file runs), so
`validate` can say a model names no mask without importing torch.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

XRV_MODELS = {  # chexforge name → the file torchxrayvision stores in its cache folder
    "xrv-densenet": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
}
XRV_STATE_DICTS = {  # chexforge name → its state dict, converted from the released file, in the same folder
    "xrv-densenet": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best"
                    ".state_dict.pt",
}
XRV_WEIGHTS = {"xrv-densenet": "densenet121-res224-all"}  # torchxrayvision's own name for it

# torchxrayvision's model_urls["all"]: the output order ("labels") and the per-label operating
# points ("op_threshs") its DenseNet maps to probability 0.5 (sigmoid, then `op_norm`).
XRV_LABELS = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
              "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
              "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")
XRV_OP_THRESHS = (0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724,
                  0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766,
                  0.053369623, 0.035975814, 0.20204692, 0.05015312)
XRV_INPUT_SIZE = 224  # pixels; values in torchxrayvision's [-1024, 1024]


def xrv_cache_dir() -> Path:
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))


def xrv_files(spec: str) -> tuple[Path, Path]:
    """(the converted state dict, torchxrayvision's released file) of an `xrv-*` name."""
    return xrv_cache_dir() / XRV_STATE_DICTS[spec], xrv_cache_dir() / XRV_MODELS[spec]


def xrv_missing(spec: str) -> str:
    """Why an `xrv-*` model cannot be used when neither of its files is on this machine."""
    return (f"the {spec} weights are not on this machine ({xrv_files(spec)[1]}); chexforge never downloads them: "
            "put the file there, or give a local TorchScript file")


def model_file(spec: str, base: Callable[[str], Path] | None) -> Path:
    """The file a model name stands for: for `xrv-*` the converted state dict when it is there,
    else torchxrayvision's released file; otherwise `base(spec)` or the path itself."""
    if spec in XRV_MODELS:
        converted, released = xrv_files(spec)
        return converted if converted.is_file() else released
    return base(spec) if base is not None else Path(spec).expanduser()


class _Stub:
    """Whatever class a TorchScript pickle names: holds its state, runs nothing."""

    state: object = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.state = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _AttributeReader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _tag=None: value  # a typed list/dict: the value itself
        return _Stub  # never a real class or function: reading the file runs no code from it

    def persistent_load(self, pid: object) -> None:
        return None  # tensors are not read


def torchscript_attributes(path: Path) -> dict | None:
    """The top module's attributes of a TorchScript file (its `data.pkl`), read without torch,
    or None when the file is not a TorchScript archive this can read (loading then says why)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                return None
            top = _AttributeReader(io.BytesIO(z.read(names[0]))).load()
    except Exception:  # noqa: BLE001 - not readable here: the loader reports it as one line
        return None
    state = getattr(top, "state", None)
    return state if isinstance(state, dict) else None


def seg_classes(path: Path) -> list[str] | None:
    """A segmentation model's `classes` (a non-empty list of names), [] when it has none or
    another kind of value, None when the file cannot be read without torch."""
    attrs = torchscript_attributes(path)
    if attrs is None:
        return None
    classes = attrs.get("classes")
    ok = isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)
    return list(classes) if ok else []


SEG_CLASSES_NEEDED = "the model needs a `classes` attribute (a list of names)"


def model_problem(spec: str, check: str, base: Callable[[str], Path] | None = None) -> str | None:
    """Why the model of a rule cannot be used, or None. Looks at files only (no torch)."""
    if check in ("sex", "mask_dice") and spec in XRV_MODELS:
        kind = "sex classifier" if check == "sex" else "segmentation model"
        return f"the {check} check needs a local TorchScript {kind} file, not {spec!r}"
    path = model_file(spec, base)
    if spec in XRV_MODELS and not path.is_file():
        return xrv_missing(spec)
    if spec not in XRV_MODELS and not path.is_file():
        return f"no such model file {str(path)!r} (expected a local TorchScript file or xrv-densenet)"
    if check == "mask_dice" and seg_classes(path) == []:
        return f"{SEG_CLASSES_NEEDED}: {str(path)!r}"
    return None
