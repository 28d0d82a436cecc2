"""Loading an output folder with the libraries users load it with: pycocotools (coco.json with RLE
segmentation and stable ids, through shards and `chexforge merge`), MONAI (datalist.json,
load_decathlon_datalist + LoadImaged), torchxrayvision (SyntheticCXRDataset with relabel_dataset
and MergeDataset next to a real xrv dataset class) and plain PyTorch (chexforge.data and the
example). One small simulated dataset per module, made in process."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexforge.cli import main
from chexforge.contracts.images import read_gray, read_mask
from chexforge.contracts.vocabulary import FINDING_NAMES

from .conftest import ROOT, write

RECIPE = """
name: loaders
seed: 11
backend: simulated
backend_options: {seconds_per_batch: 0, batch_size: 8}
output: {size: 64, formats: [png], masks: true}
cohorts:
  - name: effusion
    count: 6
    view: [PA, AP]
    findings:
      Effusion: {laterality: bilateral}
      Nodule: {p: 0.5, laterality: [left, right]}
    masks: [lungs, lung_left, heart]
  - name: normal
    count: 4
"""


def run(*args: str) -> None:
    assert main([*args]) == 0, args


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The whole dataset, its two shards and the shards merged by `chexforge merge`."""
    tmp = tmp_path_factory.mktemp("loaders")
    recipe = write(tmp, RECIPE)
    out = {name: tmp / name for name in ("whole", "shard0", "shard1", "merged")}
    run("generate", str(recipe), "--out", str(out["whole"]), "--no-progress")
    for i in range(2):
        run("generate", str(recipe), "--out", str(out[f"shard{i}"]), "--shard", f"{i}/2", "--no-progress")
    run("merge", str(out["shard0"]), str(out["shard1"]), "--out", str(out["merged"]))
    return out


@pytest.fixture(scope="module")
def whole(folders):
    return folders["whole"]


def manifest(out: Path) -> pd.DataFrame:
    df = pq.read_table(out / "manifest.parquet").to_pandas()
    assert (df.status == "ok").all()
    return df


def mask_of(out: Path, row, name: str) -> np.ndarray:
    (path,) = [m["path"] for m in row.masks if m["name"] == name]
    return read_mask(out / path)


# ---- COCO ------------------------------------------------------------------------------------


def test_coco_segmentation_is_each_boxs_region_of_its_mask(whole):
    from pycocotools.coco import COCO

    coco = COCO(str(whole / "coco.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    df = manifest(whole).set_index("job_id")
    bilateral = 0
    for img in coco.loadImgs(coco.getImgIds()):
        row = df.loc[img["job_id"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        boxes = [a for a in anns if names[a["category_id"]] in FINDING_NAMES]
        assert len(boxes) == len(row.realised_boxes)
        for ann in anns:
            name = names[ann["category_id"]]
            full = mask_of(whole, row, name)
            got = coco.annToMask(ann).astype(bool)
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            inside = np.zeros_like(full)
            inside[y:y + h, x:x + w] = True
            assert got.any() and ann["iscrowd"] == 0 and ann["area"] == got.sum()
            assert np.array_equal(got, full & inside), (img["job_id"], name)  # the mask, within the box, nothing else
            if name not in FINDING_NAMES:  # anatomy: the whole mask, boxed by its extent
                assert np.array_equal(got, full)
        for name in {names[a["category_id"]] for a in boxes}:
            same = [a for a in boxes if names[a["category_id"]] == name]
            union = np.logical_or.reduce([coco.annToMask(a).astype(bool) for a in same])
            assert np.array_equal(union, mask_of(whole, row, name))  # the boxes of a finding split its mask
            bilateral += name == "Effusion" and len(same) == 2
        assert {names[a["category_id"]] for a in anns} - set(FINDING_NAMES) == (
            {"lungs", "lung_left", "heart"} if row.cohort == "effusion" else {"lungs"})
    assert bilateral == 6  # every effusion image: one mask, two boxes, two regions


def test_coco_ids_are_unique_exact_in_javascript_and_derived_from_the_job(whole):
    from chexforge.export.coco import image_id

    coco = json.loads((whole / "coco.json").read_text())
    images, anns = [i["id"] for i in coco["images"]], [a["id"] for a in coco["annotations"]]
    assert len(set(images)) == len(images) == 10 and len(set(anns)) == len(anns)
    assert max(images + anns) < 2**53 and min(images + anns) > 0
    for img in coco["images"]:
        assert img["id"] == image_id(["effusion", "normal"].index(img["cohort"]), img["index"])
    per_image = {}
    for a in coco["annotations"]:  # image id × 1024 + the annotation's place in its image
        k = per_image.setdefault(a["image_id"], 0)
        assert a["id"] == a["image_id"] * 1024 + k
        per_image[a["image_id"]] += 1


def test_coco_ids_are_the_same_in_shards_in_the_merge_and_in_one_run(folders):
    from pycocotools.coco import COCO

    files = {name: COCO(str(out / "coco.json")) for name, out in folders.items()}
    by_job = {name: {img["job_id"]: img["id"] for img in c.loadImgs(c.getImgIds())} for name, c in files.items()}
    shard_jobs = [set(by_job["shard0"]), set(by_job["shard1"])]
    assert shard_jobs[0] and shard_jobs[1] and not shard_jobs[0] & shard_jobs[1]
    assert set(by_job["merged"]) == set(by_job["whole"]) == shard_jobs[0] | shard_jobs[1]
    for job, merged_id in by_job["merged"].items():
        shard = "shard0" if job in shard_jobs[0] else "shard1"
        assert by_job[shard][job] == merged_id == by_job["whole"][job]
        # The image looked up by that id is the same job everywhere, with the same annotations.
        anns = {name: files[name].loadAnns(files[name].getAnnIds(imgIds=merged_id)) for name in (shard, "merged")}
        assert files[shard].loadImgs(merged_id)[0]["job_id"] == job
        assert anns[shard] == anns["merged"] and anns[shard]


# ---- MONAI -----------------------------------------------------------------------------------


def test_monai_datalist_loads_and_its_boxes_cover_their_masks_after_load_imaged(whole):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    path = whole / "datalist.json"
    header = json.loads(path.read_text())
    assert header["findings"] == list(FINDING_NAMES) and header["numTraining"] == 10
    items = load_decathlon_datalist(str(path), data_list_key="training", base_dir=str(whole))
    assert len(items) == 10
    df = manifest(whole).set_index("job_id")
    structures = header["structures"]
    assert {"mask_Effusion", "mask_lungs", "mask_heart"} <= set(structures)
    checked = transposed_misses = 0
    for item in items:
        row = df.loc[item["job_id"]]
        assert item["label"] == [int(row[f]) for f in FINDING_NAMES]
        assert Path(item["image"]).is_file() and "spacing" not in item  # the simulated backend has no geometry
        keys = ["image", *(k for k in structures if k in item)]
        data = LoadImaged(keys=keys, ensure_channel_first=True)(item)
        image = np.asarray(data["image"])
        assert image.shape == (1, 64, 64)
        # LoadImaged's array is the PNG transposed (PILReader reverses axes): axis 1 is x.
        assert np.allclose(image[0], read_gray(whole / row.image_png).T * 65535, atol=0.5)
        for key in keys[1:]:
            assert np.array_equal(np.asarray(data[key])[0] > 0, mask_of(whole, row, structures[key]).T)
        for label in set(item["box_label"]):
            name = FINDING_NAMES[label]
            mask = np.asarray(data["mask_" + name.replace(" ", "_")])[0] > 0
            covered, flipped = np.zeros_like(mask), np.zeros_like(mask)
            for box, lab in zip(item["box"], item["box_label"]):
                if lab != label:
                    continue
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                assert mask[x0:x1, y0:y1].any()
                covered[x0:x1, y0:y1] = True
                flipped[y0:y1, x0:x1] = True
            assert mask[~covered].sum() == 0  # every mask pixel is inside a box of its finding
            transposed_misses += mask[~flipped].sum() > 0
            checked += 1
    assert checked >= 6 and transposed_misses > 0  # the check bites: boxes read (y, x) would miss


def test_monai_spacing_is_the_patient_plane_pixel_size_when_the_backend_knows_it():
    from chexforge.export.monai import spacing_mm

    assert spacing_mm(json.dumps({"geometry": {"pixel_mm": 0.33, "magnification": 1.1}})) == 0.3
    assert spacing_mm(json.dumps({"simulated": True})) is None and spacing_mm(None) is None


# ---- torchxrayvision ---------------------------------------------------------------------------


def real_chexpert(tmp: Path, n: int = 5):
    """torchxrayvision's own CheX_Dataset over the first n frontal rows of the CheXpert label
    file its wheel ships, with small gray JPEGs where the images would be."""
    import torchxrayvision as xrv

    with gzip.open(Path(xrv.datasets.datapath) / "chexpert_train.csv.gz", "rt") as f:
        csv = pd.read_csv(f, nrows=200)
    csv = csv[csv["Frontal/Lateral"] == "Frontal"].head(n)
    csvpath = tmp / "chexpert_train_subset.csv"  # xrv derives patient ids from "train" in the path
    csv.to_csv(csvpath, index=False)
    for i, rel in enumerate(csv["Path"]):
        dest = tmp / "images" / rel.replace("CheXpert-v1.0-small/", "")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(dest, format="JPEG")
    return xrv.datasets.CheX_Dataset(imgpath=str(tmp / "images"), csvpath=str(csvpath), views=["PA", "AP"],
                                     unique_patients=False)


def test_synthetic_dataset_mixes_with_a_real_xrv_dataset(whole, tmp_path):
    import torchxrayvision as xrv

    from chexforge.data import SyntheticCXRDataset

    real = real_chexpert(tmp_path)
    synth = SyntheticCXRDataset(whole, masks=True)
    assert synth.pathologies == [f for f in FINDING_NAMES if f != "No Finding"]
    assert synth.labels.shape == (10, 15) and synth.labels.dtype == np.float32
    assert len(synth.csv) == 10 and {"patientid", "age_years", "sex_male", "view"} <= set(synth.csv.columns)
    pathologies = xrv.datasets.default_pathologies
    for ds in (real, synth):
        xrv.datasets.relabel_dataset(pathologies, ds, silent=True)
    mixed = xrv.datasets.Merge_Dataset([real, synth])
    assert len(mixed) == len(real) + 10 and mixed.labels.shape == (len(real) + 10, len(pathologies))
    assert "SyntheticCXRDataset num_samples=10" in mixed.string()
    assert np.isnan(mixed.labels[len(real):, pathologies.index("Infiltration")]).all()  # not in chexforge's vocabulary
    effusion = pathologies.index("Effusion")
    df = manifest(whole)
    for k in range(10):
        item = mixed[len(real) + k]
        row = df[df.job_id == synth.csv.job_id[k]].iloc[0]
        assert item["source"] == 1 and item["lab"][effusion] == row["Effusion"]
        png = read_gray(whole / row.image_png)
        assert item["img"].shape == (1, 64, 64) and item["img"].dtype == np.float32
        assert np.allclose(item["img"][0], (2 * png - 1) * 1024, atol=1e-3)  # xrv.datasets.normalize's scale
        if row["Effusion"] == 1:
            assert np.array_equal(item["pathology_masks"][effusion][0] > 0, mask_of(whole, row, "Effusion"))
        assert set(item["semantic_masks"]) <= {"lungs", "lung_left", "lung_right", "heart"}
    assert mixed[0]["img"].shape == (1, 32, 32) and mixed[0]["source"] == 0  # the real one, side by side
    # xrv's own transforms move the image and its masks together.
    small = SyntheticCXRDataset(whole, masks=True, views=["PA"],
                                transform=xrv.datasets.XRayResizer(32, engine="skimage"))
    item = small[0]
    assert set(small.csv.view) == {"PA"} and item["img"].shape == (1, 32, 32)
    assert all(m.shape == (1, 32, 32) for m in item["semantic_masks"].values())


# ---- plain PyTorch ---------------------------------------------------------------------------


def test_torch_dataset_gives_every_finding_masks_and_boxes(whole):
    from torch.utils.data import DataLoader

    from chexforge.data import ChexforgeDataset, collate

    ds = ChexforgeDataset(whole)
    assert ds.findings == list(FINDING_NAMES) and len(ds) == 10
    assert ds.structures[:1] == ["Effusion"] and {"lungs", "lung_left", "heart"} <= set(ds.structures)
    batch = next(iter(DataLoader(ds, batch_size=10, collate_fn=collate)))
    assert batch["image"].shape == (10, 1, 64, 64) and batch["labels"].shape == (10, len(FINDING_NAMES))
    assert batch["masks"].shape == (10, len(ds.structures), 64, 64)
    df = manifest(whole).set_index("job_id")
    for i, job in enumerate(batch["job_id"]):
        row = df.loc[job]
        assert batch["labels"][i].tolist() == [float(row[f]) for f in FINDING_NAMES]
        for c, name in enumerate(ds.structures):
            has = name in {m["name"] for m in row.masks}
            assert bool(batch["has_mask"][i, c]) == has
            want = mask_of(whole, row, name) if has else np.zeros((64, 64), bool)
            assert np.array_equal(batch["masks"][i, c].numpy() > 0, want)
        assert len(batch["boxes"][i]) == len(row.realised_boxes)
        for box, label in zip(batch["boxes"][i].round().int().tolist(), batch["box_labels"][i].tolist()):
            x0, y0, x1, y1 = box  # torchvision order on the H×W tensor: x is the column
            assert batch["masks"][i, ds.structures.index(FINDING_NAMES[label]), y0:y1, x0:x1].any()


def test_the_torch_example_runs_on_a_generated_folder(whole, capsys):
    spec = importlib.util.spec_from_file_location("torch_dataset_example", ROOT / "examples" / "torch_dataset.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([str(whole)])
    assert result["images"] == 10 and all(np.isfinite(result["losses"]))
    assert result["batch"]["labels"].shape[1] == len(FINDING_NAMES)
    assert "Effusion" in capsys.readouterr().out
