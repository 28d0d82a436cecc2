"""Adherence with user-supplied TorchScript models: known answers from tiny scripted 'models'
that look up each image's answer by a code stamped in its top-left pixel."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from chexforge.cli import main
from chexforge.contracts.images import read_mask
from chexforge.errors import UserError
from chexforge.evaluate import adherence as A
from chexforge.evaluate.images import load_set
from chexforge.plan import plan
from chexforge.recipe import load_recipe
from chexforge.runtime import RunOptions, run

from .conftest import write

RECIPE = """
name: adh
seed: 5
backend: simulated
output: {size: 64, formats: [png], masks: true}
cohorts:
  - {name: f, count: 3, demographics: {sex: F, age: 30}, findings: {Nodule: true}}
  - {name: m, count: 3, demographics: {sex: M, age: 70}, findings: {Nodule: true}}
"""


class Lookup(torch.nn.Module):
    """Returns table[i] for the image whose top-left pixel is (i + 1) / 32: a stand-in network."""

    def __init__(self, table: torch.Tensor, classes: list[str]):
        super().__init__()
        self.register_buffer("table", table)
        self.classes = classes
        self.input_size = 64

    def forward(self, x):
        idx = torch.round(x[:, 0, 0, 0] * 32).long() - 1
        return self.table[idx]


def script(path, table, classes=("Nodule",)):
    torch.jit.script(Lookup(torch.as_tensor(np.asarray(table), dtype=torch.float32), list(classes))).save(str(path))
    return path


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A simulated output folder (3 F aged 30, 3 M aged 70, a Nodule mask and box each) whose
    images carry their index code; and the manifest rows in load order."""
    tmp = tmp_path_factory.mktemp("adh")
    r = load_recipe(write(tmp, RECIPE))
    out = tmp / "out"
    run(plan(r), r, out, RunOptions(progress=False))
    rows = [x for x in pq.read_table(out / "manifest.parquet").to_pylist() if x["status"] == "ok"]
    assert len(rows) == 6
    for i, row in enumerate(rows):
        img = np.asarray(Image.open(out / row["image_png"])).astype(np.uint16)
        img[0, 0] = round((i + 1) / 32 * 65535)
        Image.fromarray(img).save(out / row["image_png"])
    s = load_set(out, 64)
    assert np.round(s.images[:, 0, 0] * 32).astype(int).tolist() == [1, 2, 3, 4, 5, 6]
    assert [x["job_id"] for x in rows] == s.ids
    return out, rows, s


def _masks(out, rows, name="Nodule"):
    return np.stack([read_mask(out / next(m["path"] for m in x["masks"] if m["name"] == name)) for x in rows])  # (6, 64, 64)


def _eval(out, dest, *args):
    return main(["eval", str(out), "--size", "64", "--out", str(dest), *map(str, args)])


def test_without_models_each_entry_says_which_flag(ds, tmp_path):
    out, _, _ = ds
    assert _eval(out, tmp_path) == 0
    a = json.loads((tmp_path / "metrics.json").read_text())["adherence"]
    for key, flag in [("sex", "--sex-model"), ("age", "--age-model"), ("segmentation", "--seg-model"),
                      ("boxes", "--det-model")]:
        assert a[key]["available"] is False and flag in a[key]["why"]


def test_sex_and_age_known_answers(ds, tmp_path):
    out, rows, s = ds
    right = [[4.0, -4.0] if x["sex"] == "F" else [-4.0, 4.0] for x in rows]
    m = A.sex_adherence(A.ScriptModel(script(tmp_path / "s.pt", right), "--sex-model"), s.images,
                        s.rows["sex"].tolist(), s.cohorts)
    assert m["accuracy"] == 1.0 and m["auroc"] == 1.0 and m["images"] == 6
    assert m["per_cohort"]["f"]["accuracy"] == 1.0 and m["per_cohort"]["f"]["auroc"] is None  # one class only
    # Two of six wrong (one of each sex): accuracy 4/6; P(F) ranks 2 of 9 F/M pairs wrong and ties none.
    wrong = [list(reversed(v)) if i in (0, 3) else v for i, v in enumerate(right)]
    m = A.sex_adherence(A.ScriptModel(script(tmp_path / "w.pt", wrong), "--sex-model"), s.images,
                        s.rows["sex"].tolist(), s.cohorts)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["auroc"] == pytest.approx(A.auroc(np.array([0.1, 0.9, 0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 1, 0, 0, 0])))
    assert m["auroc"] < 1
    ages = [[33.0], [27.0], [30.0], [70.0], [76.0], [70.0]]  # errors 3, 3, 0, 0, 6, 0 → MAE 2
    m = A.age_adherence(A.ScriptModel(script(tmp_path / "a.pt", ages), "--age-model"), s.images,
                        s.rows["age"].tolist(), s.cohorts)
    assert m["mae"] == pytest.approx(2.0) and m["per_cohort"]["m"]["mae"] == pytest.approx(2.0)
    assert m["pearson_r"] == pytest.approx(np.corrcoef([33, 27, 30, 70, 76, 70], [30, 30, 30, 70, 70, 70])[0, 1])


def test_dice_of_the_own_masks_is_one_and_of_shifted_ones_computed_by_hand(ds, tmp_path):
    out, rows, s = ds
    truth = _masks(out, rows)
    assert truth.any(axis=(1, 2)).all()
    own = np.where(truth, 5.0, -5.0)[:, None]
    m = A.seg_adherence(A.ScriptModel(script(tmp_path / "g.pt", own), "--seg-model", True),
                        s.images, s.rows["masks"].tolist(), out)
    assert m["per_class"]["Nodule"] == {"dice": 1.0, "masks": 6} and m["mean_dice"] == 1.0
    shifted = np.roll(truth, 3, axis=2)
    by_hand = np.mean([2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(shifted, truth)])
    seg = A.ScriptModel(script(tmp_path / "h.pt", np.where(shifted, 1.0, -1.0)[:, None]), "--seg-model", True)
    m = A.seg_adherence(seg, s.images, s.rows["masks"].tolist(), out)
    assert m["mean_dice"] == pytest.approx(by_hand) and 0 < m["mean_dice"] < 1
    # A model whose classes the dataset has no masks of: unavailable, saying which.
    other = A.ScriptModel(script(tmp_path / "o.pt", own, ["Pneumothorax"]), "--seg-model", True)
    m = A.seg_adherence(other, s.images, s.rows["masks"].tolist(), out)
    assert m["available"] is False and "Pneumothorax" in m["why"] and "Nodule" in m["why"]


def _boxes(rows, dx=0.0, label=0.0):
    return [[[b["x0"] + dx, b["y0"], b["x1"] + dx, b["y1"], label] for b in x["realised_boxes"]]
            + [[0, 0, 0, 0, -1.0]] for x in rows]  # one padding row each


def test_box_hit_rate_true_shifted_and_iou_threshold(ds, tmp_path):
    out, rows, s = ds
    truth = s.rows["realised_boxes"].tolist()
    assert sum(len(t) for t in truth) == 6

    def rate(table, iou=0.3, classes=("Nodule",)):
        det = A.ScriptModel(script(tmp_path / "d.pt", table, classes), "--det-model", True)
        return A.det_adherence(det, s.images, truth, iou)

    assert rate(_boxes(rows))["hit_rate"] == 1.0
    assert rate(_boxes(rows, dx=2.0))["hit_rate"] == 0.0  # moved off the box
    assert rate(_boxes(rows), classes=("Mass",))["hit_rate"] == 0.0  # right place, wrong label
    # Shifted by a third of each box's width: IoU = (2/3) / (4/3) = 0.5.
    third = [[[b["x0"] + (b["x1"] - b["x0"]) / 3, b["y0"], b["x1"] + (b["x1"] - b["x0"]) / 3, b["y1"], 0.0]
              for b in x["realised_boxes"]] for x in rows]
    assert rate(third, iou=0.45)["hit_rate"] == 1.0 and rate(third, iou=0.55)["hit_rate"] == 0.0
    assert A.iou((0, 0, 1, 1), (0.5, 0, 1.5, 1)) == pytest.approx(1 / 3)


def test_cli_with_all_four_models(ds, tmp_path, capsys):
    out, rows, _ = ds
    sex = script(tmp_path / "s.pt", [[3.0, -3.0] if x["sex"] == "F" else [-3.0, 3.0] for x in rows])
    age = script(tmp_path / "a.pt", [[float(x["age"])] for x in rows])
    seg = script(tmp_path / "g.pt", np.where(_masks(out, rows), 1.0, -1.0)[:, None])
    det = script(tmp_path / "d.pt", _boxes(rows))
    assert _eval(out, tmp_path / "r", "--sex-model", sex, "--age-model", age, "--seg-model", seg,
                 "--det-model", det, "--iou", "0.5") == 0
    a = json.loads((tmp_path / "r/metrics.json").read_text())["adherence"]
    assert a["sex"]["accuracy"] == 1.0 and a["sex"]["auroc"] == 1.0
    assert a["age"]["mae"] == 0.0 and a["age"]["pearson_r"] == pytest.approx(1.0)
    assert a["segmentation"]["mean_dice"] == 1.0
    assert a["boxes"]["hit_rate"] == 1.0 and a["boxes"]["iou"] == 0.5
    shown = capsys.readouterr().out
    assert "box hit rate" in shown and "sex accuracy" in shown


def test_bad_model_files_exit_2_with_one_line(ds, tmp_path, capsys):
    out, rows, _ = ds
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    three = script(tmp_path / "three.pt", [[0.0, 0.0, 0.0]] * 6)
    no_classes = tmp_path / "nc.pt"
    torch.jit.script(torch.nn.Identity()).save(str(no_classes))
    cases = [
        (["--sex-model", tmp_path / "junk.pt"], "--sex-model: not a loadable TorchScript file"),
        (["--age-model", tmp_path / "missing.pt"], "--age-model: no such model file"),
        (["--sex-model", three], "--sex-model: expected (N, 2) logits for (female, male), got shape (6, 3)"),
        (["--seg-model", no_classes], "--seg-model: the model needs a `classes` attribute"),
        (["--det-model", three], "--det-model: expected (N, K, 5)"),
        (["--iou", "0"], "--iou must be in (0, 1]"),
    ]
    capsys.readouterr()
    for args, says in cases:
        assert _eval(out, tmp_path / "r", *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err


def test_script_model_resizes_to_input_size():
    class Shape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_size = 32

        def forward(self, x):
            return torch.tensor([float(x.shape[2]), float(x.shape[3])])[None].repeat(x.shape[0], 1)

    import io
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Shape()), buf)
    m = A.ScriptModel.__new__(A.ScriptModel)
    m.net, m.size, m.flag, m.path = torch.jit.load(io.BytesIO(buf.getvalue())), 32, "--x", None
    assert torch.cat(m(np.zeros((3, 64, 64), np.float32))).tolist() == [[32.0, 32.0]] * 3
    with pytest.raises(UserError):
        A.ScriptModel("/no/such.pt", "--sex-model")
