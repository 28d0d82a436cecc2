"""Label readers, the bias audit, balance plans, and the priors (natural findings, prior layouts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from chexforge.balance.audit import audit
from chexforge.balance.topup import BalanceSpec, allocate, fill, jobs_to_tidy, topup_recipe
from chexforge.contracts.vocabulary import FINDING_NAMES
from chexforge.errors import UserError
from chexforge.labels.readers import read_labels, sniff
from chexforge.plan import plan
from chexforge.recipe import parse_recipe

CHEXPERT = """\
Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0
CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,,,,,,,1.0,
CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,,,1.0,,,,,,,0.0,1.0,,,
"""
NIH = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.168,0.168
00000003_000.png,Nodule|Effusion|Infiltration,0,3,30,F,PA,2048,2500,0.168,0.168
"""
PADCHEST = """\
,ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,MethodProjection,Labels
0,a.png,0,20140915,s1,p1,1930.0,F,POSTEROANTERIOR,PA,Manual review,['normal']
1,b.png,0,20150914,s2,p2,1929.0,M,LATERAL,L,Manual review,"['pleural effusion', 'cardiomegaly', 'NSG tube']"
2,c.png,0,20120101,s3,p3,1950.0,M,AP,AP_horizontal,Manual review,"['nodule', 'callus rib fracture']"
"""
MIMIC_LABELS = """\
subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
10000032,50414267,,,,,,,,,1.0,,,,,
10000764,57375967,,,-1.0,,,,,1.0,,,,-1.0,0.0,
"""
MIMIC_META = """\
dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns
02aa804e,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544
174413ec,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544
ea030e7a,10000764,57375967,CHEST (PORTABLE AP),AP,2539,3050
"""
MIMIC_PATIENTS = """\
subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000032,F,52,2180,2014 - 2016,2180-09-09
10000764,M,86,2132,2014 - 2016,
"""
MIMIC_ADMISSIONS = """\
subject_id,hadm_id,admittime,race
10000032,22595853,2180-05-06 22:23:00,WHITE
10000032,22841357,2180-06-26 18:27:00,WHITE
10000764,27897940,2132-10-14 23:31:00,BLACK/AFRICAN AMERICAN
"""


def put(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_chexpert_reader(tmp_path):
    p = put(tmp_path, "train.csv", CHEXPERT)
    assert sniff(p) == "chexpert"
    df = read_labels(p)
    assert list(df.sex) == ["F", "F", "F", "M"] and list(df.view) == ["AP", "AP", "LL", "PA"]
    assert list(df.patient) == ["patient00001", "patient00002", "patient00002", "patient00003"]
    assert df.loc[1, "Cardiomegaly"] == 0 and df.loc[3, "Cardiomegaly"] == 1  # uncertain → negative by default
    assert df.loc[3, "Effusion"] == 1 and df.loc[0, "No Finding"] == 0  # support devices count as a finding
    pos = read_labels(p, uncertain="positive")
    assert pos.loc[1, "Cardiomegaly"] == 1 and pos.loc[1, "Effusion"] == 1
    ign = read_labels(p, uncertain="ignore")
    assert np.isnan(ign.loc[1, "Cardiomegaly"])


def test_nih_reader(tmp_path):
    df = read_labels(put(tmp_path, "Data_Entry_2017.csv", NIH))
    assert list(df.sex) == ["M", "M", "F", "F"] and list(df.age) == [57, 58, 81, 30]
    assert df.loc[1, "Cardiomegaly"] == 1  # Emphysema has no vocabulary entry, Cardiomegaly stays
    assert df.loc[3, ["Nodule", "Lung Lesion", "Effusion", "Lung Opacity"]].tolist() == [1, 1, 1, 1]
    assert df.loc[2, "No Finding"] == 1 and df.loc[3, "No Finding"] == 0


def test_padchest_reader(tmp_path):
    df = read_labels(put(tmp_path, "padchest.csv", PADCHEST))
    assert list(df.age) == [84, 86, 62] and list(df.view) == ["PA", "LL", "AP"]
    assert df.loc[0, "No Finding"] == 1
    assert df.loc[1, ["Effusion", "Cardiomegaly", "Support Devices"]].tolist() == [1, 1, 1]
    assert df.loc[2, ["Nodule", "Fracture"]].tolist() == [1, 1]


def test_mimic_reader_joins_metadata_patients_and_admissions(tmp_path):
    df = read_labels(put(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS), metadata=put(tmp_path, "meta.csv", MIMIC_META),
                     patients=put(tmp_path, "patients.csv", MIMIC_PATIENTS), admissions=put(tmp_path, "admissions.csv", MIMIC_ADMISSIONS))
    df = df.set_index("image")
    assert df.loc["02aa804e", "view"] == "PA" and df.loc["174413ec", "view"] == "LL"
    assert df.loc["ea030e7a", ["sex", "age", "race"]].tolist() == ["M", 86, "BLACK/AFRICAN AMERICAN"]
    assert df.loc["02aa804e", "race"] == "WHITE" and df.loc["ea030e7a", "Lung Opacity"] == 1
    labels_only = read_labels(tmp_path / "mimic-cxr-2.0.0-chexpert.csv")
    assert len(labels_only) == 2 and labels_only.sex.isna().all()


def test_manifest_reader(tmp_path):
    from chexforge.contracts.jobs import write_jobs

    r = parse_recipe("name: m\ncohorts: [{name: a, count: 6, findings: {Effusion: 0.5}}]\n")
    write_jobs(plan(r), tmp_path / "jobs.parquet")
    df = read_labels(tmp_path / "jobs.parquet")
    assert len(df) == 6 and df.Effusion.sum() == 3


@pytest.mark.parametrize("text,where,what", [
    (CHEXPERT.replace(",68,", ",sixty,"), ":2", "column 'Age': expected a number from 0 to 120, got 'sixty'"),
    (CHEXPERT.replace("0.0,1.0,,,", "0.0,2.0,,,"), ":5", "column 'Pleural Effusion': expected one of -1, 0, 1 or empty, got 2.0"),
    (CHEXPERT.replace("Path,", "Pth,"), ":1", "missing column(s) 'Path'"),
])
def test_malformed_label_files_name_row_and_column(tmp_path, text, where, what):
    p = put(tmp_path, "train.csv", text)
    with pytest.raises(UserError) as e:
        read_labels(p, "chexpert")
    assert e.value.line() == f"{p}{where}: {what}"


def test_nih_unknown_label_is_located(tmp_path):
    p = put(tmp_path, "nih.csv", NIH.replace("Cardiomegaly|Emphysema", "Cardiomegaly|Gremlins"))
    with pytest.raises(UserError, match=r"nih.csv:3: column 'Finding Labels': unknown label 'Gremlins'"):
        read_labels(p)


def table(counts: dict[tuple[str, str], tuple[int, int]]) -> pd.DataFrame:
    """A tidy table with given (sex, age) group sizes and Effusion positives."""
    rows = []
    ages = {"18-39": 30, "40-59": 50, "60-79": 70, "80+": 85}
    for (sex, age), (n, pos) in counts.items():
        for i in range(n):
            rows.append({"image": f"{sex}{age}{i}", "patient": None, "sex": sex, "age": float(ages[age]), "race": None,
                         "view": "PA", "Effusion": float(i < pos)})
    df = pd.DataFrame(rows)
    from chexforge.contracts.vocabulary import FINDING_NAMES

    for f in FINDING_NAMES:
        if f not in df:
            df[f] = 0.0
    df["No Finding"] = 1.0 - df["Effusion"]
    return df


KNOWN = {("F", "40-59"): (50, 10), ("F", "60-79"): (80, 30), ("M", "40-59"): (120, 20), ("M", "60-79"): (100, 40)}


def test_audit_known_answers():
    rep = audit(table(KNOWN), ["sex", "age"])
    groups = {(g["group"]["sex"], g["group"]["age"]): g for g in rep["groups"]}
    assert groups[("F", "40-59")]["n"] == 50 and groups[("F", "40-59")]["size_ratio"] == pytest.approx(50 / 120)
    assert groups[("M", "60-79")]["prevalence"]["Effusion"] == pytest.approx(0.4)
    assert rep["imbalance"]["size_min_over_max"] == pytest.approx(50 / 120)
    assert rep["imbalance"]["Effusion"]["spread"] == pytest.approx(0.4 - 20 / 120)
    assert {g["group"]["sex"]: g["n"] for g in rep["marginals"]["sex"]} == {"F": 130, "M": 220}


def test_fill_water_levels():
    c = np.array([10, 50, 30])
    assert fill(c, np.full(3, 50), None).tolist() == [40, 0, 20]
    assert fill(c, np.full(3, 50), 30).tolist() == [25, 0, 5]  # both low cells rise to 35
    assert fill(c, np.full(3, 50), 31).sum() == 31


def after_audit(df, spec):
    alloc = allocate(df, spec)
    text, _ = topup_recipe(df, alloc, spec, "test")
    synthetic = jobs_to_tidy(plan(parse_recipe(text)))
    return alloc, audit(pd.concat([df, synthetic], ignore_index=True), spec.by)


def test_parity_is_reached_exactly():
    df = table(KNOWN)
    alloc, after = after_audit(df, BalanceSpec(by=["sex", "age"]))
    assert alloc["add"].tolist() == [70, 40, 0, 20]
    assert {g["n"] for g in after["groups"]} == {120} and after["imbalance"]["size_min_over_max"] == 1.0


def test_per_finding_parity_of_positives():
    df = table(KNOWN)
    alloc, after = after_audit(df, BalanceSpec(by=["sex", "age"], per_finding=True, findings=["Effusion"]))
    assert alloc["add"].tolist() == [30, 10, 20, 0]
    assert {g["positives"]["Effusion"] for g in after["groups"]} == {40}


def test_reference_target_and_budget_and_min_per_cell(tmp_path):
    df = table(KNOWN)
    ref = pd.DataFrame({"sex": ["F", "F", "M", "M"], "age": ["40-59", "60-79", "40-59", "60-79"], "share": [1, 1, 1, 1]})
    alloc = allocate(df, BalanceSpec(by=["sex", "age"], target="reference", reference=ref))
    assert (alloc["real"] + alloc["add"]).tolist() == [120] * 4  # equal shares = parity
    ref2 = ref.assign(share=[2, 1, 1, 1])  # F 40-59 should be twice the others
    alloc2 = allocate(df, BalanceSpec(by=["sex", "age"], target="reference", reference=ref2))
    totals = (alloc2["real"] + alloc2["add"]).to_numpy()
    assert totals[0] == 2 * totals[2] and totals[1] == totals[2] == totals[3]
    capped = allocate(df, BalanceSpec(by=["sex", "age"], budget=50))
    assert capped["add"].tolist() == [40, 10, 0, 0]  # 50 rises to 80, then both to 90
    floor = allocate(df, BalanceSpec(by=["sex", "age"], per_finding=True, findings=["Effusion"], min_per_cell=35))
    assert ((floor["real"] + floor["add"]) >= 35).all()


def test_the_topup_recipe_loads_whatever_the_names(tmp_path):
    """Many findings and long group names (issue 13 item 6): ruamel wrapped a flow mapping's key
    across lines ("Pleural\\n Other:"), so balance refused its own recipe as a YAML syntax error."""
    from chexforge.recipe import recipe_to_yaml

    rng = np.random.default_rng(3)
    races = ["HISPANIC/LATINO - PUERTO RICAN", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "WHITE - OTHER EUROPEAN",
             "BLACK/CAPE VERDEAN", "x: y # z", "'quoted' [a] {b}", "tab\there", "accent é", "next\x85line"]
    n = 400
    for pad in range(0, 60, 7):  # move every break point across the keys
        df = pd.DataFrame({"image": [f"i{i}" for i in range(n)], "patient": [f"p{i}" for i in range(n)],
                           "sex": rng.choice(["F", "M"], n, p=[0.3, 0.7]), "age": rng.integers(20, 90, n).astype(float),
                           "race": rng.choice([r + "-" * pad for r in races], n), "view": rng.choice(["PA", "AP"], n)})
        for f in FINDING_NAMES:
            df[f] = (rng.random(n) < 0.2).astype(float)
        spec = BalanceSpec(by=["sex"], name="b" * 150)
        text, data = topup_recipe(df, allocate(df, spec), spec, f"labels\n{pad}.csv")
        recipe = parse_recipe(text)  # what topup_recipe checks too; it raised "YAML syntax error"
        (cohort,) = recipe.cohorts
        assert set(cohort.demographics.race) == set(df["race"]) and len(cohort.finding_specs) == len(FINDING_NAMES) - 1
        assert len(recipe.name) <= 100 and parse_recipe(recipe_to_yaml(recipe)).cohorts[0].count == cohort.count


def test_balance_cli_on_a_chexpert_file_and_generate(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,"
            "Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"]
    for i in range(300):
        sex = "Female" if i % 3 == 0 else "Male"  # one woman for two men
        eff = "1.0" if rng.random() < 0.3 else ""
        rows.append(f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg,{sex},{int(rng.integers(20, 90))},"
                    f"Frontal,PA,,,{'1.0' if rng.random() < 0.1 else ''},,,,,,,,{eff},,,")
    labels = tmp_path / "train.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "balance.yaml"
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "balance", str(labels), "--by", "sex", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    after = json.loads((tmp_path / "balance_report" / "audit_after.json").read_text())
    assert after["imbalance"]["size_min_over_max"] == 1.0
    assert (tmp_path / "balance_report" / "audit.png").stat().st_size > 10_000
    text = out.read_text()
    assert "count: 100" in text and "sex: F" in text
    gen = subprocess.run([sys.executable, "-m", "chexforge.cli", "generate", str(out), "--out", str(tmp_path / "gen"),
                          "--limit", "3", "--no-progress"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr


def test_balance_leaves_out_ages_the_backend_cannot_make(tmp_path):
    from chexforge.balance import LabelSource, balance_labels

    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,"
            "Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"]
    ages = [8] * 10 + [30] * 40 + [70] * 20  # children, young adults, elderly
    rows += [f"p{i}.jpg,Female,{a},Frontal,PA,1.0,,,,,,,,,,,,," for i, a in enumerate(ages)]
    labels = tmp_path / "train.csv"
    labels.write_text("\n".join(rows) + "\n")
    r = balance_labels(LabelSource(str(labels)), tmp_path / "b.yaml", by="age", age_bins="0,18,40,60")
    # Parity is 40 per bin: 30 more children (0-17) and 20 more aged 60+; the drr backend's
    # patients are adult CTs, so only the 20 are planned, and the note says what was left out.
    assert r.added == 20 and r.cohorts == 1
    assert any("30 images for ages 0-17 are left out" in n for n in r.notes), r.notes
    recipe = parse_recipe((tmp_path / "b.yaml").read_text())
    assert [c.demographics.age.bounds() for c in recipe.cohorts] == [(60, 95)]
    # Without an age group, the cohort's ages are kept inside the backend's range too.
    r = balance_labels(LabelSource(str(labels)), tmp_path / "s.yaml", by="sex", min_per_cell=100)
    (cohort,) = parse_recipe((tmp_path / "s.yaml").read_text()).cohorts
    assert cohort.demographics.age.bounds() == (18, 70)


def test_topup_keeps_each_groups_prevalence_and_pooled_moves_it():
    """Parity top-ups carry each group's own prevalence by default, so a group's prevalence after
    equals the one before; `prevalence="pooled"` (the old behaviour) gives every top-up the pooled
    prevalence (0.286 here) and pulls each group toward it."""
    df = table(KNOWN)  # Effusion: F 40-59 0.20, F 60-79 0.375, M 40-59 0.167, M 60-79 0.40
    before = {tuple(g["group"].values()): g["prevalence"]["Effusion"] for g in audit(df, ["sex", "age"])["groups"]}
    _, after = after_audit(df, BalanceSpec(by=["sex", "age"]))
    kept = {tuple(g["group"].values()): g["prevalence"]["Effusion"] for g in after["groups"]}
    for group, p in before.items():
        assert kept[group] == pytest.approx(p, abs=0.02), group  # 70 of 120 images synthetic in F 40-59
    _, pooled = after_audit(df, BalanceSpec(by=["sex", "age"], prevalence="pooled"))
    moved = {tuple(g["group"].values()): g["prevalence"]["Effusion"] for g in pooled["groups"]}
    assert moved[("F", "40-59")] > before[("F", "40-59")] + 0.04  # 0.20 pulled up toward 0.286
    assert moved[("M", "40-59")] == pytest.approx(before[("M", "40-59")])  # the largest group gets no top-up


def young_and_unknown(df: pd.DataFrame) -> pd.DataFrame:
    """`df` plus 7 children and 2 adults of unknown sex (one of them also of unknown age)."""
    extra = df.iloc[:9].copy()
    extra["image"] = [f"x{i}" for i in range(9)]
    extra["age"] = [5.0] * 7 + [50.0, np.nan]
    extra["sex"] = ["F"] * 7 + [None, None]
    extra["Effusion"] = [1.0] * 3 + [0.0] * 6
    return pd.concat([df, extra], ignore_index=True)


def test_excluded_rows_are_counted_with_their_reason_in_the_printed_table():
    from rich.console import Console

    from chexforge.balance.table import audit_table

    df = young_and_unknown(table(KNOWN))
    rep = audit(df, ["sex", "age"])
    excluded = {e["label"]: e for e in rep["excluded"]}
    assert {k: e["n"] for k, e in excluded.items()} == {"under 18": 7, "sex unknown": 1, "sex unknown, age unknown": 1}
    assert sum(e["n"] for e in rep["excluded"]) == rep["excluded_unknown_group"] == 9
    assert excluded["under 18"]["prevalence"]["Effusion"] == pytest.approx(3 / 7)
    console = Console(record=True, width=200)
    console.print(audit_table(rep, title="t", room=200)[0])
    text = console.export_text()
    assert "under 18 (excluded)" in text and "younger than the first age bin (18-39)" in text
    assert "--age-bins 0,18,40,60,80 makes them a group" in text and "42.9" in text  # their prevalence is shown
    assert "sex unknown (excluded)" in text and "not recorded in the label file" in text
    # After a balance the rows stay as they were and the note says they are not topped up.
    after = dict(rep, left_out={"under 18": "not in the top-up (the drr backend makes ages 18 and up)"})
    console = Console(record=True, width=200)
    console.print(audit_table(rep, after, room=200)[0])
    text = console.export_text()
    assert "7→7" in text and "backend makes ages 18 and up" in text  # (the note column wraps)


def test_audit_and_balance_tables_say_which_views_they_count(tmp_path):
    """`audit` reads every view, `balance` frontal views only: each table's caption gives the
    filter and both counts, so the two "before" columns can be reconciled."""
    from rich.console import Console

    from chexforge.balance import LabelSource, audit_labels, balance_labels
    from chexforge.balance.table import audit_table

    labels = put(tmp_path, "train.csv", CHEXPERT)  # 3 frontal (2 AP, 1 PA) and 1 lateral
    a = audit_labels(str(labels), by="sex")
    b = balance_labels(LabelSource(str(labels), frontal_only=True), tmp_path / "b.yaml", by="sex")
    assert a.images == 4 and b.real == 3 and b.before["source"] == {**a.report["source"], "filter":
                                                                     "frontal views only (PA, AP)", "kept": 3}

    def caption(report, after=None):
        console = Console(record=True, width=200)
        console.print(audit_table(report, after, room=200)[0])
        return console.export_text()

    assert "all views: 4 rows (AP 2, LL 1, PA 1); `chexforge balance` keeps frontal views only (PA, AP: 3 rows)" \
        in caption(a.report)
    assert "frontal views only (PA, AP): 3 of 4 rows" in caption(b.before, b.after)


def test_before_and_after_heatmaps_share_one_scale_and_show_the_numbers():
    import matplotlib.pyplot as plt

    from chexforge.balance.chart import audit_figure

    df = young_and_unknown(table(KNOWN))
    _, after = after_audit(df, BalanceSpec(by=["sex", "age"], prevalence="pooled"))
    before = audit(df, ["sex", "age"])
    fig = audit_figure(before, after)
    try:
        heat = [ax for ax in fig.axes if ax.images]
        assert len(heat) == 2 and heat[0].images[0].get_clim() == heat[1].images[1 - 1].get_clim()
        top = max(g["prevalence"][f] or 0 for rep in (before, after) for g in rep["groups"] for f in before["findings"])
        assert heat[0].images[0].get_clim() == (0, pytest.approx(top))  # the highest of either panel
        cells = [t.get_text() for t in heat[0].texts]
        assert len(cells) == len(before["groups"]) * len(before["findings"]) and "37.5" in cells  # F 60-79 Effusion
        assert "under 18 7" in " ".join(t.get_text() for t in fig.texts)
    finally:
        plt.close(fig)


# ---- priors ---------------------------------------------------------------------------------------


def test_natural_findings_reproduce_the_real_cooccurrence(tiny_model):
    """20,000 planned women aged 60-79 on AP films: the joint distribution of all the prior's
    findings matches it (chi-square over the combinations), dependence included."""
    from chexforge.priors.tables import joint_distribution, prior_findings

    r = parse_recipe(f"""
name: nat
backend: diffusion
model: {tiny_model}
cohorts:
  - {{name: a, count: 20000, view: AP, demographics: {{sex: F, age: [60, 79]}}, findings: natural}}
""")
    df = plan(r).to_pandas()
    order = prior_findings()
    want = joint_distribution(order, "F", "60-79", "AP")
    got = pd.Series(sum(df[f].to_numpy(np.int64) << i for i, f in enumerate(order)))
    observed = got.value_counts().reindex(want.index, fill_value=0)
    assert observed.sum() == len(df)  # only combinations the prior publishes
    common = want >= 0.005
    rest = np.array([observed[~common].sum()])
    stat = stats.chisquare(np.concatenate([observed[common].to_numpy(), rest]),
                           np.concatenate([want[common].to_numpy(), [want[~common].sum()]]) * len(df))
    assert stat.pvalue > 0.001, stat
    # Edema and Effusion go together in the real data (P(both) 0.173 vs 0.145 if independent).
    both = ((df.Edema == 1) & (df.Effusion == 1)).mean()
    assert abs(both - 0.1733) < 0.01 and both - df.Edema.mean() * df.Effusion.mean() > 0.015


def test_natural_findings_with_drr_keep_what_it_renders(monkeypatch):
    import dataclasses

    from chexforge.contracts import backends as registry

    r = parse_recipe("name: nat\ncohorts: [{name: a, count: 2000, findings: natural}]\n")
    df = plan(r).to_pandas()
    assert df[["Effusion", "Cardiomegaly", "Edema", "Pneumonia", "Support Devices"]].sum().min() > 0
    # A backend that renders fewer findings gets only those.
    narrow = dataclasses.replace(registry.BACKENDS["drr"], findings=("No Finding", "Effusion", "Cardiomegaly"))
    monkeypatch.setitem(registry.BACKENDS, "drr", narrow)
    df = plan(r).to_pandas()
    assert df.Effusion.sum() > 0 and df.Cardiomegaly.sum() > 0
    assert df[["Edema", "Pneumonia", "Support Devices"]].to_numpy().sum() == 0


def test_prior_boxes_sit_on_the_requested_side(tiny_model):
    r = parse_recipe(f"""
name: boxes
backend: diffusion
model: {tiny_model}
cohorts:
  - name: left
    count: 400
    findings: {{Effusion: {{laterality: left}}, Nodule: {{laterality: right}}}}
    layout: prior
  - name: both
    count: 50
    findings: {{Effusion: {{laterality: bilateral}}}}
    layout: prior
""")
    df = plan(r).to_pandas()
    left = df[df.cohort == "left"]
    for boxes in left.boxes:
        eff = [b for b in boxes if b["label"] == "Effusion"]
        nod = [b for b in boxes if b["label"] == "Nodule"]
        assert len(eff) == 1 and (eff[0]["x0"] + eff[0]["x1"]) / 2 > 0.5  # patient's left: image right
        assert len(nod) == 1 and (nod[0]["x0"] + nod[0]["x1"]) / 2 < 0.5
        assert all(0 <= b["x0"] < b["x1"] <= 1 and 0 <= b["y0"] < b["y1"] <= 1 for b in boxes)
    assert all(len(b) == 2 for b in df[df.cohort == "both"].boxes)


def test_prior_masks_from_the_library(tiny_model):
    from chexforge.priors import masks

    if not masks.available():
        pytest.skip("torchxrayvision is not installed")
    r = parse_recipe(f"""
name: m
backend: diffusion
model: {tiny_model}
cohorts:
  - {{name: a, count: 6, findings: {{Pneumothorax: {{laterality: left}}}}, layout: prior, masks: [lungs]}}
""")
    df = plan(r).to_pandas()
    for ref in df.mask_ref:
        parts = ref.split(";")
        assert any(p.startswith("prior:lungs#") for p in parts) and any(p.startswith("prior:siim#") for p in parts)
        siim = next(p for p in parts if p.startswith("prior:siim#"))
        m = masks.load(siim, 64)
        assert m.any() and np.argwhere(m)[:, 1].mean() > 32  # a left pneumothorax, on the image right


def test_priors_rebuild_from_the_label_files(tmp_path):
    from chexforge.priors import build
    from chexforge.priors.masks import available

    if not available():
        pytest.skip("torchxrayvision is not installed")
    build.build(tmp_path)
    for name in ("cooccurrence.parquet", "boxes.json", "meta.json"):
        committed = (build.DATA / name)
        if name.endswith(".parquet"):
            assert pd.read_parquet(tmp_path / name).equals(pd.read_parquet(committed))
        else:
            assert json.loads((tmp_path / name).read_text()) == json.loads(committed.read_text())
