"""Real label files → one tidy table: sex, age, race, view, and one column per finding.

Readers: CheXpert `train.csv`, MIMIC-CXR (`*-chexpert.csv` joined with the metadata and, when
given, MIMIC-IV `patients.csv` and `admissions.csv`), NIH ChestX-ray14 `Data_Entry_2017*.csv`,
PadChest, and chexforge manifests. The format is sniffed from the columns or given.

The tidy table (a pandas DataFrame, plain data between stages):
    image (str), patient (str or NA), sex ("F"/"M"/NA), age (float, years), race (str or NA),
    view ("PA"/"AP"/"LL"/NA), and a float column per vocabulary finding: 1 present, 0 absent,
    NaN unknown (an uncertain label under `uncertain="ignore"`).

`xrv:chexpert`, `xrv:nih`, `xrv:padchest` name the label files that ship inside the
torchxrayvision package (found without importing it).
"""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..contracts.limits import (
    MAX_CELL_CHARS,
    MAX_LABEL_BYTES,
    MAX_LABEL_COLUMNS,
    MAX_LABEL_ROWS,
    open_limited,
)
from ..contracts.vocabulary import FINDING_NAMES, NO_FINDING
from ..errors import UserError

FORMATS = ("chexpert", "mimic", "nih", "padchest", "manifest")
UNCERTAIN = ("negative", "positive", "ignore")
XRV_FILES = {"chexpert": "chexpert_train.csv.gz", "nih": "Data_Entry_2017_v2020.csv.gz",
             "padchest": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"}

CHEXPERT_COLUMNS = {  # CheXpert/MIMIC label columns → vocabulary
    "No Finding": "No Finding", "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly", "Lung Opacity": "Lung Opacity", "Lung Lesion": "Lung Lesion",
    "Edema": "Edema", "Consolidation": "Consolidation", "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax", "Pleural Effusion": "Effusion", "Pleural Other": "Pleural Other",
    "Fracture": "Fracture", "Support Devices": "Support Devices",
}
NIH_LABELS = {  # ChestX-ray14 → vocabulary (Emphysema, Fibrosis and Hernia have no vocabulary entry)
    "Atelectasis": ["Atelectasis"], "Cardiomegaly": ["Cardiomegaly"], "Effusion": ["Effusion"],
    "Infiltration": ["Lung Opacity"], "Mass": ["Mass", "Lung Lesion"], "Nodule": ["Nodule", "Lung Lesion"],
    "Pneumonia": ["Pneumonia", "Lung Opacity"], "Pneumothorax": ["Pneumothorax"],
    "Consolidation": ["Consolidation", "Lung Opacity"], "Edema": ["Edema", "Lung Opacity"],
    "Pleural_Thickening": ["Pleural Other"], "No Finding": ["No Finding"],
}
PADCHEST_LABELS = {  # PadChest's English terms → vocabulary
    "normal": ["No Finding"], "cardiomegaly": ["Cardiomegaly"], "pleural effusion": ["Effusion"],
    "loculated pleural effusion": ["Effusion"], "pneumothorax": ["Pneumothorax"], "hydropneumothorax": ["Pneumothorax", "Effusion"],
    "pneumonia": ["Pneumonia", "Lung Opacity"], "consolidation": ["Consolidation", "Lung Opacity"],
    "atelectasis": ["Atelectasis"], "laminar atelectasis": ["Atelectasis"], "lobar atelectasis": ["Atelectasis"],
    "segmental atelectasis": ["Atelectasis"], "total atelectasis": ["Atelectasis"], "round atelectasis": ["Atelectasis"],
    "pulmonary edema": ["Edema", "Lung Opacity"], "nodule": ["Nodule", "Lung Lesion"], "multiple nodules": ["Nodule", "Lung Lesion"],
    "pulmonary mass": ["Mass", "Lung Lesion"], "mass": ["Mass", "Lung Lesion"], "infiltrates": ["Lung Opacity"],
    "alveolar pattern": ["Lung Opacity"], "interstitial pattern": ["Lung Opacity"], "increased density": ["Lung Opacity"],
    "ground glass pattern": ["Lung Opacity"], "pleural thickening": ["Pleural Other"],
    "apical pleural thickening": ["Pleural Other"], "pleural plaques": ["Pleural Other"],
    "calcified pleural thickening": ["Pleural Other"], "mediastinal enlargement": ["Enlarged Cardiomediastinum"],
    "callus rib fracture": ["Fracture"], "rib fracture": ["Fracture"], "fracture": ["Fracture"],
    "vertebral fracture": ["Fracture"], "clavicle fracture": ["Fracture"], "humeral fracture": ["Fracture"],
}
DEVICE_WORDS = ("tube", "catheter", "pacemaker", "chamber device", "electrical device", "drain")


def resolve(source: str | Path) -> Path:
    """A path, or `xrv:<name>` for a label file shipped inside torchxrayvision."""
    text = str(source)
    if text.startswith("xrv:"):
        name = text[4:]
        if name not in XRV_FILES:
            raise UserError(f"unknown torchxrayvision label file {name!r}; expected one of {', '.join(XRV_FILES)}")
        return xrv_data_dir() / XRV_FILES[name]
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError("no such label file", path)
    return path


def xrv_data_dir() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the torchxrayvision package is not installed (pip install --no-deps torchxrayvision: "
                        "its wheel ships the public label files)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sniff(path: Path) -> str:
    if path.suffix == ".parquet":
        return "manifest"
    head = _read_csv(path, nrows=2)
    cols = set(head.columns)
    if {"Finding Labels", "Patient Gender"} <= cols:
        return "nih"
    if {"PatientSex_DICOM", "Labels"} <= cols:
        return "padchest"
    if {"subject_id", "study_id"} <= cols and "Pleural Effusion" in cols:
        return "mimic"
    if {"Path", "Sex", "Age"} <= cols and "Pleural Effusion" in cols:
        return "chexpert"
    raise UserError("cannot tell the label format from the columns; give --format "
                    f"({', '.join(FORMATS)})", f"{path}:1")


def read_labels(source: str | Path, fmt: str | None = None, uncertain: str = "negative",
                metadata: str | Path | None = None, patients: str | Path | None = None,
                admissions: str | Path | None = None) -> pd.DataFrame:
    path = resolve(source)
    fmt = fmt or sniff(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if uncertain not in UNCERTAIN:
        raise UserError(f"unknown uncertain-label policy {uncertain!r}; expected one of {', '.join(UNCERTAIN)}")
    if fmt == "chexpert":
        return read_chexpert(path, uncertain)
    if fmt == "mimic":
        return read_mimic(path, uncertain, metadata, patients, admissions)
    if fmt == "nih":
        return read_nih(path)
    if fmt == "padchest":
        return read_padchest(path)
    return read_manifest_labels(path)


# ---- helpers ------------------------------------------------------------------------------------


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    """A CSV (plain or compressed) read under the limits: at most MAX_LABEL_BYTES once
    decompressed, at most MAX_LABEL_COLUMNS columns; a damaged file is one line."""
    if path.is_dir():
        raise UserError("expected a label file, not a folder", path)
    try:
        with open_limited(path, MAX_LABEL_BYTES, "label file") as stream, warnings.catch_warnings():
            # Rows with more fields than the header: an error, never an index made of the first columns
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(stream, low_memory=False, compression=None, index_col=False, **kw)
    except UserError:
        raise
    except (OSError, ValueError, TypeError, OverflowError, MemoryError, pd.errors.ParserError,
            pd.errors.ParserWarning, UnicodeDecodeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"not a readable CSV ({first[:160]})", path) from None
    if df.shape[1] > MAX_LABEL_COLUMNS:
        raise UserError(f"the label file has {df.shape[1]} columns; chexforge reads at most {MAX_LABEL_COLUMNS}",
                        f"{path}:1")
    return df


def _csv(path: Path, need: list[str], **kw) -> pd.DataFrame:
    df = _read_csv(path, **kw)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"missing column(s) {', '.join(repr(c) for c in missing)}", f"{path}:1")
    return df


def _numbers(df: pd.DataFrame, col: str, path: Path, allowed: set[float] | None = None,
             lo: float | None = None, hi: float | None = None) -> pd.Series:
    """A numeric column; the first non-empty cell that is not a valid number is a located error
    (`path:LINE` of a CSV, `path: row N` of a Parquet table)."""
    raw = df[col]
    try:
        num = pd.to_numeric(raw, errors="coerce")
    except (TypeError, ValueError):  # cells that are not scalars (lists in a Parquet file)
        num = pd.to_numeric(raw.map(lambda v: v if np.isscalar(v) else np.nan), errors="coerce")
    num = num.astype(float)
    bad = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    bad |= np.isinf(num)
    if allowed is not None:
        bad |= num.notna() & ~num.isin(list(allowed))
    if lo is not None:
        bad |= num.notna() & ((num < lo) | (num > hi))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        what = f"one of {', '.join(str(int(a)) for a in sorted(allowed))} or empty" if allowed is not None else \
            (f"a number from {lo:g} to {hi:g}" if lo is not None else "a number")
        value = raw.iloc[i]
        shown = repr(value.item() if hasattr(value, "item") else value)
        where = f"{path}: row {i + 1}" if path.suffix == ".parquet" else f"{path}:{i + 2}"
        raise UserError(f"column {col!r}: expected {what}, got {shown[:60]}", where)
    return num


def _labels(values: pd.Series, uncertain: str) -> pd.Series:
    """CheXpert coding: 1 positive, 0 negative, -1 uncertain, blank not mentioned (= negative)."""
    out = values.fillna(0.0)
    if uncertain == "negative":
        return out.replace(-1.0, 0.0)
    if uncertain == "positive":
        return out.replace(-1.0, 1.0)
    return out.replace(-1.0, np.nan)


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing finding columns, derive No Finding as the planner does, fix the column order."""
    for f in FINDING_NAMES:
        if f not in df:
            df[f] = 0.0
    others = [f for f in FINDING_NAMES if f != NO_FINDING]
    df[NO_FINDING] = np.where(df[others].fillna(0).max(axis=1) > 0, 0.0, 1.0)
    for col in ("patient", "race"):
        if col not in df:
            df[col] = pd.NA
    cols = ["image", "patient", "sex", "age", "race", "view", *FINDING_NAMES]
    return df[cols].reset_index(drop=True)


# ---- the readers --------------------------------------------------------------------------------


def read_chexpert(path: Path, uncertain: str = "negative") -> pd.DataFrame:
    need = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]
    df = _csv(path, need)
    out = pd.DataFrame({"image": df["Path"].astype(str)})
    out["patient"] = df["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
    out["sex"] = df["Sex"].map({"Female": "F", "Male": "M"})
    out["age"] = _numbers(df, "Age", path, lo=0, hi=120)
    frontal = df["Frontal/Lateral"].astype(str).str.lower() == "frontal"
    out["view"] = np.where(frontal, df["AP/PA"].where(df["AP/PA"].isin(["PA", "AP"])), "LL")
    for col, name in CHEXPERT_COLUMNS.items():
        out[name] = _labels(_numbers(df, col, path, allowed={1.0, 0.0, -1.0}), uncertain)
    return _finish(out)


def read_mimic(path: Path, uncertain: str, metadata: str | Path | None, patients: str | Path | None,
               admissions: str | Path | None) -> pd.DataFrame:
    labels = _csv(path, ["subject_id", "study_id", *CHEXPERT_COLUMNS])
    labels = _keys(labels, ["subject_id", "study_id"])
    out = labels[["subject_id", "study_id"]].copy()
    for col, name in CHEXPERT_COLUMNS.items():
        out[name] = _labels(_numbers(labels, col, path, allowed={1.0, 0.0, -1.0}), uncertain)
    if metadata is not None:  # one row per image, with its view
        mp = resolve(metadata)
        meta = _keys(_csv(mp, ["dicom_id", "subject_id", "study_id", "ViewPosition"]), ["subject_id", "study_id"])
        out = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].merge(out, on=["subject_id", "study_id"], how="inner")
        out["image"] = out["dicom_id"].astype(str)
        out["view"] = out["ViewPosition"].map({"PA": "PA", "AP": "AP", "LATERAL": "LL", "LL": "LL"})
    else:
        out["image"] = out["study_id"].astype(str)
        out["view"] = pd.NA
    out["patient"] = out["subject_id"].astype(str)
    out["sex"], out["age"], out["race"] = pd.NA, np.nan, pd.NA
    if patients is not None:
        pp = resolve(patients)
        pat = _keys(_csv(pp, ["subject_id", "gender", "anchor_age"]), ["subject_id"])
        pat["anchor_age"] = _numbers(pat, "anchor_age", pp, lo=0, hi=120)
        out = out.drop(columns=["sex", "age"]).merge(
            pat[["subject_id", "gender", "anchor_age"]].rename(columns={"gender": "sex", "anchor_age": "age"}),
            on="subject_id", how="left")
        out["sex"] = out["sex"].where(out["sex"].isin(["F", "M"]))
    if admissions is not None:
        ap = resolve(admissions)
        adm = _keys(_csv(ap, ["subject_id"]), ["subject_id"])
        col = "race" if "race" in adm else ("ethnicity" if "ethnicity" in adm else None)
        if col is None:
            raise UserError("missing column 'race' (MIMIC-IV) or 'ethnicity' (older releases)", f"{ap}:1")
        # A patient's most frequent recorded race across admissions.
        race = adm.dropna(subset=[col]).astype({col: str}).groupby("subject_id")[col].agg(lambda s: s.value_counts().index[0])
        out = out.drop(columns=["race"]).merge(race.rename("race"), left_on="subject_id", right_index=True, how="left")
    return _finish(out)


def read_nih(path: Path) -> pd.DataFrame:
    df = _csv(path, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"])
    out = pd.DataFrame({"image": df["Image Index"].astype(str), "patient": df["Patient ID"].astype(str)})
    out["sex"] = df["Patient Gender"].where(df["Patient Gender"].isin(["F", "M"]))
    out["age"] = _numbers(df, "Patient Age", path, lo=0, hi=120)
    out["view"] = df["View Position"].where(df["View Position"].isin(["PA", "AP"]))
    labels = df["Finding Labels"].fillna("").astype(str)
    known = set(NIH_LABELS) | {"Emphysema", "Fibrosis", "Hernia", ""}
    tokens = labels.str.split("|")
    flat = tokens.explode()
    unknown = ~flat.isin(known)
    if unknown.any():
        i = int(flat.index[unknown.to_numpy()][0])
        raise UserError(f"column 'Finding Labels': unknown label {flat[unknown].iloc[0]!r}", f"{path}:{i + 2}")
    for label, names in NIH_LABELS.items():
        hit = labels.str.contains(rf"(?:^|\|){label}(?:\||$)", regex=True).astype(float)
        for name in names:
            out[name] = np.maximum(out[name], hit) if name in out else hit
    return _finish(out)


def read_padchest(path: Path) -> pd.DataFrame:
    df = _csv(path, ["ImageID", "PatientID", "PatientBirth", "PatientSex_DICOM", "StudyDate_DICOM", "Projection", "Labels"])
    out = pd.DataFrame({"image": df["ImageID"].astype(str), "patient": df["PatientID"].astype(str)})
    out["sex"] = df["PatientSex_DICOM"].where(df["PatientSex_DICOM"].isin(["F", "M"]))
    birth = _numbers(df, "PatientBirth", path, lo=1880, hi=2030)
    study_year = _numbers(df, "StudyDate_DICOM", path, lo=19000101, hi=20991231) // 10000
    out["age"] = (study_year - birth).where(lambda a: (a >= 0) & (a <= 120))
    out["view"] = df["Projection"].map({"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LL"})
    findings = {f: np.zeros(len(df)) for f in FINDING_NAMES}
    for i, text in enumerate(df["Labels"].tolist()):
        if not isinstance(text, str) or not text.strip():
            continue
        terms = None
        if len(text) <= MAX_CELL_CHARS:
            try:
                terms = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass
        if not isinstance(terms, (list, tuple)):
            raise UserError(f"column 'Labels': expected a list like ['normal'], got {text[:60]!r}", f"{path}:{i + 2}")
        for term in terms:
            term = str(term).strip().lower()
            for name in PADCHEST_LABELS.get(term, ()):
                findings[name][i] = 1.0
            if any(w in term for w in DEVICE_WORDS):
                findings["Support Devices"][i] = 1.0
    for name, values in findings.items():
        out[name] = values
    return _finish(out)


def read_manifest_labels(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        if meta.num_rows > MAX_LABEL_ROWS or meta.num_columns > MAX_LABEL_COLUMNS:
            raise UserError(f"the table has {meta.num_rows} rows and {meta.num_columns} columns; chexforge reads at "
                            f"most {MAX_LABEL_ROWS} rows and {MAX_LABEL_COLUMNS} columns as labels", path)
        names = set(pq.read_schema(path).names)
        if "job_id" not in names or "sex" not in names:
            raise UserError("not a chexforge manifest or jobs table (no job_id/sex columns)", path)
        wanted = [c for c in ("job_id", "patient_id", "status", "sex", "age", "race", "view", *FINDING_NAMES)
                  if c in names]
        df = pq.read_table(path, columns=wanted).to_pandas()
    except UserError:
        raise
    except (OSError, ValueError, TypeError, KeyError, MemoryError, NotImplementedError, pa.ArrowException) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"not a readable Parquet file ({first[:160]})", path) from None
    missing = [c for c in ("age", "view") if c not in df]
    if missing:
        raise UserError(f"not a chexforge manifest or jobs table (no {'/'.join(missing)} column)", path)
    if "status" in df:
        df = df[df["status"].astype(str) == "ok"].reset_index(drop=True)
    text = lambda col: df[col].map(lambda v: v if isinstance(v, str) else None)  # noqa: E731
    # The patient: patient_id (a study's images share it), or the job itself in a table without it
    patient = text("patient_id").fillna(df["job_id"].astype(str)) if "patient_id" in df else df["job_id"].astype(str)
    out = pd.DataFrame({"image": df["job_id"].astype(str), "patient": patient,
                        "sex": text("sex").where(text("sex").isin(["F", "M"])),
                        "age": _numbers(df, "age", path, lo=0, hi=120),
                        "race": text("race") if "race" in df else pd.NA,
                        "view": text("view").where(text("view").isin(["PA", "AP", "LL"]))})
    for f in FINDING_NAMES:
        out[f] = _numbers(df, f, path, allowed={0.0, 1.0}).fillna(0.0) if f in df else 0.0
    return _finish(out)


def _keys(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Join keys as text, the same in every file: 10000032 whether read as an integer, as a
    float (a column with blanks) or as text."""
    df = df.copy()
    for c in cols:
        df[c] = df[c].astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    return df
