"""Fuzz (issue 13): the recipe loader, the job-table reader (`generate --jobs`: read_jobs, the
table's recipe, the runtime's JobSource) and the label-file readers on a few thousand seeded
mutations of valid inputs. Every input must end in success or one UserError of one line (what
the CLI prints with exit status 2), never another exception, each case in bounded time, the
process in bounded memory.

A seeded mutation loop rather than hypothesis: the cases are the same on every run and machine,
and the whole test costs a fixed budget (about 20 s on two busy cores).
"""

from __future__ import annotations

import gzip
import io
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from chexforge.errors import UserError

from .conftest import ROOT

CASE_SECONDS = 2.0  # per input, on a loaded machine; each takes milliseconds
MEMORY_GROWTH_MB = 1500

YAML_TOKENS = [b"&a ", b"*a", b"&b [*a, *a, *a, *a]", b"[", b"]", b"{", b"}", b"- ", b": ", b"? ", b"!!", b"!!omap ",
               b"!!set ", b"!!binary ", b"!!python/object:os.system ", b"<<: *a", b"\x00", b"\t", b"'", b'"', b"\n",
               b"\r\n", b"\xc2\x85", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"\xff", b".inf", b"-.inf", b".nan", b"1e999",
               b"9" * 5000, b"#", b"%YAML 1.1\n", b"---\n", b"...\n", b"|\n", b">\n", b"~", b"~nobody/x", b"null",
               b"2001-13-45", b"0x1F", b"0o17", b"[" * 60, b"{a: " * 60, b"- " * 60, b"count: -1", b"name: " + b"a" * 300,
               b"view: {PA: 1, AP: .nan}", b"Nodule: .inf", b"ct_library: /nonexistent", b"'[/a]': 1", b"  ", b"\\u0000"]
JSON_TOKENS = [b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"\\u0000", b"\\ud800", b"null", b"NaN", b"Infinity",
               b"1e999", b"9" * 5000, b"-", b"\x00", b"\xff", b'"cohorts"', b'"count"', b'"name"', b"[" * 60, b"true"]
CSV_TOKENS = [b",", b"\n", b"\r\n", b'"', b"'", b"-1.0", b"1.0", b"0.0", b"2.0", b"nan", b"inf", b"-inf", b"1e400",
              b"Female", b"Male", b"F", b"M", b"PA", b"AP", b"Frontal", b"Lateral", b";", b"\t", b"x" * 5000, b"\x00",
              b"\xff", b"[", b"['normal', 5]", b"[[[[[[", b"{}", b"5", b"No Finding", b"Pleural Effusion", b"|", b" ",
              b"\xef\xbb\xbf", b'"a""b"', b"\\"]

RECIPE_SEEDS = [p.read_bytes() for p in sorted((ROOT / "recipes").glob("*.yaml"))] + [
    b"name: t\nseed: 1\ncohorts:\n  - name: a\n    count: 10\n    view: {PA: 3, AP: 1}\n    demographics:\n"
    b"      sex: F\n      age: {mean: 60, sd: 10, min: 30, max: 90}\n      race: {Asian: 1, Black: 1, White: 2}\n"
    b"    findings:\n      Effusion: {p: 0.5, laterality: [left]}\n",
    b"name: s\nbackend: simulated\nqc: {rules: [{check: not_blank}]}\noutput: {size: 64, formats: [png]}\ncohorts:\n"
    b"  - {name: a, count: 3, layout: {boxes: [{label: Nodule, box: [0.1, 0.1, 0.3, 0.3]}]}, masks: [lungs]}\n"
    b"  - {name: b, count: 2, findings: natural, demographics: {age: {bins: {'40-64': 1, '80+': 2}}}}\n",
]

CHEXPERT = (b"Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
            b"Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
            b"Fracture,Support Devices\n"
            b"CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n"
            b"CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n"
            b"CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,,,,,,,1.0,\n"
            b"CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,,,1.0,,,,,,,0.0,1.0,,,\n")
NIH = (b"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
       b"OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
       b"00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143\n"
       b"00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
       b"00000003_000.png,Nodule|Effusion|Infiltration,0,3,30,F,PA,2048,2500,0.168,0.168\n")
PADCHEST = (b",ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,"
            b"Projection,MethodProjection,Labels\n"
            b"0,a.png,0,20140915,s1,p1,1930.0,F,POSTEROANTERIOR,PA,Manual review,['normal']\n"
            b"1,b.png,0,20150914,s2,p2,1929.0,M,LATERAL,L,Manual review,\"['pleural effusion', 'cardiomegaly', 'NSG tube']\"\n"
            b"2,c.png,0,20120101,s3,p3,1950.0,M,AP,AP_horizontal,Manual review,\"['nodule', 'callus rib fracture']\"\n")
MIMIC = (b"subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
         b"Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
         b"10000032,50414267,,,,,,,,,1.0,,,,,\n10000764,57375967,,,-1.0,,,,,1.0,,,,-1.0,0.0,\n")
LABEL_SEEDS = [(CHEXPERT, "chexpert"), (NIH, "nih"), (PADCHEST, "padchest"), (MIMIC, "mimic")]


def mutate(data: bytes, rng: random.Random, tokens: list[bytes]) -> bytes:
    """One to four edits: insert a token, flip a byte, delete or repeat a span, truncate, splice lines."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(out) + 1)
        if op < 0.4:
            out[i:i] = rng.choice(tokens)
        elif op < 0.55 and out:
            out[min(i, len(out) - 1)] = rng.randrange(256)
        elif op < 0.7:
            del out[i:i + rng.randint(1, 40)]
        elif op < 0.8:
            span = bytes(out[i:i + rng.randint(1, 80)])
            out[i:i] = span * rng.randint(2, 50)
        elif op < 0.85:
            del out[i:]
        else:
            lines = bytes(out).split(b"\n")
            rng.shuffle(lines) if rng.random() < 0.3 else lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
            out = bytearray(b"\n".join(lines))
    return bytes(out)


class Outcomes:
    """Runs the cases, keeps what went wrong (with the input) instead of stopping at the first."""

    def __init__(self, tmp: Path):
        self.tmp, self.ok, self.refused, self.slowest = tmp, 0, 0, 0.0
        self.wrong: list[str] = []
        self.peak_mb = _peak_mb()

    def run(self, what: str, case: Callable[[], object], data: bytes | str) -> None:
        t = time.perf_counter()
        try:
            case()
            self.ok += 1
        except UserError as e:
            self.refused += 1
            if "\n" in e.line() or "\r" in e.line():
                self.wrong.append(f"{what}: a UserError of more than one line: {e.line()[:200]!r} for {_shown(data)}")
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            self.wrong.append(f"{what}: {type(e).__name__}: {str(e)[:200]} for {_shown(data)}")
        seconds = time.perf_counter() - t
        self.slowest = max(self.slowest, seconds)
        if seconds > CASE_SECONDS:
            self.wrong.append(f"{what}: took {seconds:.1f} s for {_shown(data)}")

    def check(self, total: int) -> None:
        grown = _peak_mb() - self.peak_mb
        assert grown < MEMORY_GROWTH_MB, f"the peak memory grew by {grown:.0f} MB"
        assert not self.wrong, f"{len(self.wrong)} of {total} cases went wrong:\n" + "\n".join(self.wrong[:20])
        assert self.ok + self.refused == total


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shown(data: bytes | str) -> str:
    text = repr(data)
    return text if len(text) < 400 else text[:400] + "..."


def test_fuzz_recipe_loader(tmp_path):
    from chexforge.recipe import load_recipe

    rng = random.Random(13)
    outcomes = Outcomes(tmp_path)
    path = tmp_path / "recipe.yaml"
    n = 1500
    for _ in range(n):
        data = mutate(rng.choice(RECIPE_SEEDS), rng, YAML_TOKENS)
        path.write_bytes(data)
        outcomes.run("recipe", lambda: load_recipe(path), data)
    outcomes.check(n)
    assert outcomes.ok > 50 and outcomes.refused > 700  # both outcomes exercised


def _jobs_seed(tmp_path: Path) -> pa.Table:
    from chexforge.plan import plan
    from chexforge.recipe import parse_recipe

    recipe = parse_recipe(RECIPE_SEEDS[-1].decode().replace("count: 3", "count: 6")
                          .replace("  - {name: b", "  - {name: e, count: 4, findings: {Effusion: {p: 1, laterality: [left, "
                                   "bilateral], severity: large}}}\n  - {name: b"))
    return plan(recipe)


def _arrow_mutation(table: pa.Table, rng: random.Random) -> pa.Table:
    """A hand edit: a column retyped, nulled, shuffled between rows, swapped, dropped or renamed,
    or the recipe in the metadata mutated or removed."""
    meta = dict(table.schema.metadata or {})
    op = rng.random()
    name = rng.choice(table.column_names)
    i = table.schema.get_field_index(name)
    n = table.num_rows
    if op < 0.15:
        key = b"chexforge.recipe"
        if rng.random() < 0.2:
            meta.pop(key, None)
        else:
            meta[key] = mutate(meta[key], rng, JSON_TOKENS)
        return table.replace_schema_metadata(meta)
    if op < 0.3:
        values = rng.choice([[rng.choice(["x", "", "zz", "0" * 16, "PA", "F", "-1"]) for _ in range(n)],
                             [rng.choice([1.5, -3.0, float("nan"), float("inf"), 1e300]) for _ in range(n)],
                             [rng.choice([-1, 2**62, 300, 7, 0, 65]) for _ in range(n)],
                             [None] * n, [[1, 2]] * n, [True] * n])
        column = pa.array(values)
    elif op < 0.45:
        values = table.column(i).to_pylist()
        for k in rng.sample(range(n), rng.randint(1, n)):
            values[k] = None
        column = pa.array(values, table.schema.field(i).type)
    elif op < 0.6:
        values = table.column(i).to_pylist()
        k = rng.randrange(n)
        values[k] = rng.choice([-1, 2**40, 121, 7, "XX", "", "g" * 16, "bilateral", "lungs", 1023, 0])
        try:
            column = pa.array(values, table.schema.field(i).type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            column = pa.array([str(v) for v in values])
    elif op < 0.7:
        other = rng.choice(table.column_names)
        column = table.column(other)
    elif op < 0.85:
        return table.drop_columns([name]).replace_schema_metadata(meta)
    else:
        names = list(table.column_names)
        names[i] = rng.choice([name.upper(), name + " ", "x", "job_id"])
        return table.rename_columns(names).replace_schema_metadata(meta)
    return table.set_column(i, name, column).replace_schema_metadata(meta)


def test_fuzz_job_table_reader(tmp_path):
    from chexforge.contracts.jobs import read_jobs, table_bytes
    from chexforge.recipe import recipe_from_json
    from chexforge.runtime.jobs import JobSource

    seed = _jobs_seed(tmp_path)
    blob = table_bytes(seed)
    rng = random.Random(7)
    outcomes = Outcomes(tmp_path)
    path = tmp_path / "jobs.parquet"

    def generate_jobs_path() -> None:  # what `generate --jobs` does before the first batch
        recipe_from_json(read_jobs(path, header_only=True), str(path))
        source = JobSource.from_parquet(path)
        assert len(source.ids()) == source.total
        for chunk in source.chunks():
            chunk.to_pylist()

    n = 500
    for k in range(n):
        if k % 2:
            data = mutate(blob, rng, [b"\x00" * 8, b"\xff" * 8, b"PAR1", b"\x15\x00"])
            path.write_bytes(data)
        else:
            table = _arrow_mutation(seed, rng)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            data = buf.getvalue()
            path.write_bytes(data)
            data = repr(table.schema)[-300:] + repr((table.schema.metadata or {}).get(b"chexforge.recipe", b""))[:300]
        outcomes.run("jobs", generate_jobs_path, data)
    outcomes.check(n)
    assert outcomes.ok > 20 and outcomes.refused > 200


def test_fuzz_label_readers(tmp_path):
    from chexforge.contracts.jobs import table_bytes
    from chexforge.labels import read_labels

    rng = random.Random(11)
    outcomes = Outcomes(tmp_path)
    manifest = table_bytes(_jobs_seed(tmp_path))
    n = 1000
    for k in range(n):
        if k % 10 == 9:  # a damaged Parquet file read as a manifest
            data = mutate(manifest, rng, [b"\x00" * 8, b"\xff" * 8, b"PAR1"])
            path, fmt = tmp_path / "m.parquet", None
            path.write_bytes(data)
        elif k % 10 == 8:  # a damaged gzip file
            raw, fmt = rng.choice(LABEL_SEEDS)
            data = mutate(gzip.compress(raw), rng, [b"\x00", b"\x1f\x8b", b"\xff" * 4])
            path = tmp_path / "labels.csv.gz"
            path.write_bytes(data)
        else:
            raw, fmt = rng.choice(LABEL_SEEDS)
            data = mutate(raw, rng, CSV_TOKENS)
            path = tmp_path / "labels.csv"
            path.write_bytes(data)
            fmt = fmt if rng.random() < 0.6 else None  # sniffed from the columns
        outcomes.run("labels", lambda p=path, f=fmt: read_labels(p, f), data)
    outcomes.check(n)
    assert outcomes.ok > 100 and outcomes.refused > 200

