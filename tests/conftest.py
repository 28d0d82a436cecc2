from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="session")
def drr64():
    """One DRR backend for the session (each CT detail level is prepared once, as jobs ask for it)."""
    from chexforge.backends.drr.backend import DRRBackend
    from chexforge.backends.drr.options import DRROptions

    return DRRBackend(DRROptions())


@pytest.fixture(scope="session")
def drr128(drr64):
    return drr64  # the same backend: a job's size picks its level, not the backend


def job(**kw) -> dict:
    base = {"job_id": "t", "cohort": "c", "seed": 1, "view": "PA", "sex": "M", "age": 60, "size": 128,
            "anatomy": ["lungs", "lung_left", "lung_right", "heart"]}
    base.update(kw)
    return base


T5_WORDS = ["<pad>", "</s>", "<unk>"] + (
    "pa ap ll chest radiograph of a an year old woman man girl boy sex female male age race left right "
    "bilateral pleural effusion nodule lung mass no acute cardiopulmonary abnormality moderate small large "
    "cardiomegaly . , :").split()


def make_tiny_t5(folder, d_model: int = 32):
    """A T5 encoder and word-level tokenizer small enough to build in a test (no download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(T5_WORDS), d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny chexforge pipeline folder (random weights, control branch), built once."""
    from chexforge.models.build import init_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    init_pipeline("tiny", "tiny", None, "tiny", None, seed=0).save(folder)
    return folder
