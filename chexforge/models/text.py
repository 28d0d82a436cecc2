"""Text encoders behind one interface: prompts → token embeddings (B, L, D) and a keep-mask (B, L).

- `OpenClipText`: an open_clip text tower (token-level hidden states after the final layer norm).
  Any open_clip text config, from a named model ("ViT-B-16") or a custom dict; weights from a
  local checkpoint holding a full CLIP state dict or the text tower alone. open_clip's BPE
  tokenizer ships inside the package, so nothing is fetched.
- `T5Text`: a T5 encoder through transformers (the ChexGen checkpoints use T5-XXL, 120 tokens ×
  4096), loaded from a local folder with `local_files_only=True`.

Both save to and load from a folder (`chexforge_text.json` says which).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .folder import read_folder_json
from .weights import load_state_dict, save_state_dict

META = "chexforge_text.json"

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "small": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6},
}


class TextEncoder(nn.Module):
    kind: str
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError


class OpenClipText(TextEncoder):
    kind = "open_clip"

    def __init__(self, text_cfg: dict[str, Any]):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer

        self.text_cfg = dict(text_cfg)
        allowed = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
                   "no_causal_mask", "pad_id", "eos_id"}
        self.tower = TextTransformer(**{k: v for k, v in self.text_cfg.items() if k in allowed},
                                     output_dim=None, proj_type="none", pool_type="argmax")
        self.dim = self.tower.width
        self.max_length = self.tower.context_length
        self.tokenizer = SimpleTokenizer(context_length=self.max_length)

    @classmethod
    def from_open_clip(cls, model: str | dict, checkpoint: str | Path | None = None) -> OpenClipText:
        """`model`: an open_clip config name (its text part is used), a preset name, or a text_cfg dict."""
        if isinstance(model, dict):
            cfg = model
        elif model in TEXT_PRESETS:
            cfg = TEXT_PRESETS[model]
        else:
            import open_clip

            full = open_clip.get_model_config(model)
            if full is None:
                raise UserError(f"unknown open_clip model {model!r}; give one of open_clip.list_models() or a text config")
            cfg = full["text_cfg"]
            if cfg.get("hf_model_name"):
                raise UserError(f"{model!r} uses a Hugging Face text tower; chexforge takes open_clip's own towers")
        enc = cls(cfg)
        if checkpoint is not None:
            enc.load_tower_weights(checkpoint)
        return enc

    def load_tower_weights(self, checkpoint: str | Path) -> None:
        state = load_state_dict(checkpoint)
        state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
        wanted = set(self.tower.state_dict())
        picked = {}
        for key, value in state.items():
            k = key.removeprefix("module.").removeprefix("text.")
            if k in wanted:
                picked[k] = value
        missing = sorted(wanted - set(picked) - {"attn_mask"})
        if missing:
            raise UserError(f"the checkpoint has no text-tower weight {missing[0]!r} (and {len(missing) - 1} more)", checkpoint)
        for k, v in picked.items():
            if tuple(v.shape) != tuple(self.tower.state_dict()[k].shape):
                raise UserError(f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(self.tower.state_dict()[k].shape)} in the config", checkpoint)
        self.tower.load_state_dict(picked, strict=False)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.tower.token_embedding.weight.device
        ids = self.tokenize(prompts).to(device)
        t = self.tower
        x = t.token_embedding(ids) + t.positional_embedding[: ids.shape[1]]
        mask = t.attn_mask[: ids.shape[1], : ids.shape[1]] if t.attn_mask is not None else None
        x = t.ln_final(t.transformer(x, attn_mask=mask))
        keep = (ids != 0).to(x.dtype)  # padding after the end-of-text token
        return x, keep

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict({k: v for k, v in self.tower.state_dict().items() if k != "attn_mask"}, folder / "model.safetensors")
        (folder / META).write_text(json.dumps({"kind": self.kind, "text_cfg": self.text_cfg}, indent=1))

    @classmethod
    def load(cls, folder: Path, meta: dict) -> OpenClipText:
        enc = cls(meta["text_cfg"])
        enc.load_tower_weights(folder / "model.safetensors")
        return enc


class T5Text(TextEncoder):
    kind = "t5"

    def __init__(self, folder: str | Path, max_length: int = 120):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError("expected a T5 encoder folder (config.json, weights, tokenizer files)", folder)
        try:
            self.model = T5EncoderModel.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the T5 encoder ({e})", folder) from None
        self.dim = self.model.config.d_model
        self.max_length = max_length

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        ids, keep = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=keep).last_hidden_state
        return hidden, keep.to(hidden.dtype)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / META).write_text(json.dumps({"kind": self.kind, "max_length": self.max_length}, indent=1))

    @classmethod
    def load(cls, folder: Path, meta: dict) -> T5Text:
        return cls(folder, meta.get("max_length", 120))


def load_text_encoder(folder: Path) -> TextEncoder:
    meta_path = folder / META
    if not meta_path.is_file():
        raise UserError(f"no {META}: not a chexforge text encoder folder", folder)
    meta = read_folder_json(folder, META)
    kinds = {"open_clip": OpenClipText, "t5": T5Text}
    if meta.get("kind") not in kinds:
        raise UserError(f"unknown text encoder kind {meta.get('kind')!r}", meta_path)
    return kinds[meta["kind"]].load(folder, meta)
