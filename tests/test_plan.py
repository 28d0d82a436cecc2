"""Planner: deterministic, count-stable, and realises the requested proportions."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from scipy import stats

from chexforge.contracts.jobs import table_bytes
from chexforge.plan import plan, read_jobs, write_jobs
from chexforge.recipe import load_recipe, parse_recipe

from .conftest import ROOT

RECIPE = """
name: p
seed: 11
cohorts:
  - name: mix
    count: {n}
    view: {{PA: 0.7, AP: 0.3}}
    demographics:
      sex: {{F: 0.3, M: 0.7}}
      age: {{mean: 62, sd: 12, min: 20, max: 95}}
      race: {{Asian: 0.2, Black: 0.3, White: 0.5}}
    findings:
      Effusion: {{p: 0.4, laterality: {{left: 0.5, right: 0.25, bilateral: 0.25}}, severity: small}}
      Nodule: 0.15
      Cardiomegaly: 0.25
"""


def recipe(n: int):
    return parse_recipe(RECIPE.format(n=n))


def test_same_recipe_same_bytes():
    a, b = plan(recipe(500)), plan(recipe(500))
    assert table_bytes(a) == table_bytes(b)


def test_jobs_are_stable_when_the_count_grows():
    small, big = plan(recipe(100)), plan(recipe(1000))
    cols = [c for c in small.column_names]
    assert small.slice(0, 100).select(cols).equals(big.slice(0, 100).select(cols))


def test_seed_changes_everything():
    a = plan(recipe(50))
    b = plan(parse_recipe(RECIPE.format(n=50).replace("seed: 11", "seed: 12")))
    assert not set(a.column("job_id").to_pylist()) & set(b.column("job_id").to_pylist())
    assert a.column("seed").to_pylist() != b.column("seed").to_pylist()


def test_ids_and_seeds_unique():
    t = plan(recipe(20000))
    assert len(set(t.column("job_id").to_pylist())) == t.num_rows
    assert len(set(t.column("seed").to_pylist())) == t.num_rows


@pytest.mark.parametrize("n", [40, 4000])
def test_proportions_within_sampling_error(n):
    """Each categorical mix passes a chi-square goodness-of-fit test; each prevalence a binomial test."""
    df = plan(recipe(n)).to_pandas()
    for col, want in [("view", {"PA": 0.7, "AP": 0.3}), ("sex", {"F": 0.3, "M": 0.7}),
                      ("race", {"Asian": 0.2, "Black": 0.3, "White": 0.5})]:
        counts = df[col].value_counts()
        observed = np.array([counts.get(k, 0) for k in want])
        assert stats.chisquare(observed, np.array(list(want.values())) * n).pvalue > 0.01, col
    for finding, p in [("Effusion", 0.4), ("Nodule", 0.15), ("Cardiomegaly", 0.25)]:
        assert stats.binomtest(int(df[finding].sum()), n, p).pvalue > 0.01, finding
    eff = df[df["Effusion"] == 1]["Effusion.laterality"].value_counts()
    observed = np.array([eff.get(k, 0) for k in ("left", "right", "bilateral")])
    assert stats.chisquare(observed, np.array([0.5, 0.25, 0.25]) * observed.sum()).pvalue > 0.01
    assert set(df.loc[df["Effusion"] == 1, "Effusion.severity"]) == {"small"}
    assert df.loc[df["Effusion"] == 0, "Effusion.laterality"].isna().all()


def test_small_cohorts_get_exact_mixes():
    """Sobol' draws: 4 jobs at 50 % female are 2 and 2 (independent draws would be all-F 1 time in 8)."""
    r = parse_recipe("""
name: s
cohorts:
  - {name: a, count: 4, demographics: {sex: {F: 1, M: 1}}}
  - {name: b, count: 8, findings: {Nodule: 0.5}}
""")
    t = plan(r).to_pandas()
    assert (t[t.cohort == "a"].sex == "F").sum() == 2
    assert t[t.cohort == "b"].Nodule.sum() == 4


def test_age_distribution():
    df = plan(recipe(4000)).to_pandas()
    assert df.age.between(20, 95).all()
    assert abs(df.age.mean() - 62) < 1.0 and abs(df.age.std() - 12) < 1.0


def test_no_finding_is_derived():
    df = plan(recipe(2000)).to_pandas()
    others = df[["Effusion", "Nodule", "Cardiomegaly"]].sum(axis=1)
    assert ((others == 0) == (df["No Finding"] == 1)).all()


def test_prompts_read_like_reports():
    r = parse_recipe("""
name: t
cohorts:
  - name: a
    count: 30
    view: PA
    demographics: {sex: F, age: 67}
    findings: {Effusion: {laterality: left, severity: moderate}}
  - name: b
    count: 3
    view: AP
    demographics: {sex: M, age: 84}
""")
    t = plan(r)
    prompts = t.column("prompt").to_pylist()
    assert prompts[0] == "PA chest radiograph of a 67-year-old woman. Moderate left pleural effusion."
    assert prompts[-1] == "AP chest radiograph of an 84-year-old man. No acute cardiopulmonary abnormality."


def test_explicit_boxes_cycle_and_set_findings(tmp_path):
    """Layouts are planner data: checked here on the schema alone (the DRR backend only takes physics)."""
    from chexforge.recipe.schema import Recipe

    csv = tmp_path / "boxes.csv"
    csv.write_text("image_id,label,x0,y0,x1,y1\nA,Nodule,0.1,0.1,0.2,0.2\nB,Mass,0.5,0.5,0.8,0.8\nB,Nodule,0.1,0.6,0.15,0.65\n")
    r = Recipe.model_validate({"name": "t", "cohorts": [
        {"name": "a", "count": 4, "layout": {"source": "explicit", "boxes_csv": str(csv)}}]})
    df = plan(r).to_pandas()
    assert list(df.mask_ref) == ["explicit:boxes.csv#A", "explicit:boxes.csv#B"] * 2
    assert [len(b) for b in df.boxes] == [1, 2, 1, 2]
    assert list(df.Nodule) == [1, 1, 1, 1] and list(df.Mass) == [0, 1, 0, 1]
    assert (df["No Finding"] == 0).all()


def test_bad_boxes_csv_names_the_row(tmp_path):
    from chexforge.errors import UserError
    from chexforge.recipe.schema import Recipe

    csv = tmp_path / "boxes.csv"
    csv.write_text("image_id,label,x0,y0,x1,y1\nA,Nodule,0.1,0.1,0.2,0.2\nB,Mass,0.9,0.5,0.8,0.8\n")
    r = Recipe.model_validate({"name": "t", "cohorts": [
        {"name": "a", "count": 4, "layout": {"source": "explicit", "boxes_csv": str(csv)}}]})
    with pytest.raises(UserError, match=r"boxes.csv:3: expected normalized"):
        plan(r)


def test_jobs_file_round_trip(tmp_path):
    t = plan(recipe(10))
    write_jobs(t, tmp_path / "jobs.parquet")
    back, meta = read_jobs(tmp_path / "jobs.parquet")
    assert back.equals(t.select(back.column_names))
    assert meta["name"] == "p"


def test_quickstart_plan_matches_its_cohorts():
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    t = plan(r)
    assert t.num_rows == 20
    eff = t.filter(pc.equal(t.column("cohort"), "effusion"))
    assert pc.all(pc.equal(eff.column("Effusion"), 1)).as_py()
    study = t.filter(pc.equal(t.column("cohort"), "pa-lateral")).to_pandas()
    assert list(study["view"]) == ["PA", "LL", "PA", "LL"] and study["patient_id"].nunique() == 2
    assert len(set(t.column("patient_id").to_pylist())) == 18


# ---- composition: one streaming tally behind the plan table, inspect, the card and the report ---------


def test_composition_does_not_depend_on_the_batch_size():
    from chexforge.plan.summary import Composition

    t = plan(recipe(500))
    whole = Composition.of(t)
    assert Composition.of(t.to_batches(max_chunksize=7)) == whole == Composition.of(t.to_batches(max_chunksize=1))
    assert list(whole.cohorts) == ["mix"] and whole.cohorts["mix"].n == 500


def test_cohort_summary_and_label_counts_match_the_rows():
    from chexforge.plan.summary import cohort_summary, label_counts

    t = plan(recipe(401))
    df = t.to_pandas()
    [s] = cohort_summary(t)
    assert s["count"] == 401 and s["female"] == round((df.sex == "F").mean(), 3)
    assert list(s["views"]) == list(df.view.value_counts().index)  # most common first
    assert s["age"] == (int(df.age.median()), df.age.min(), df.age.max())  # odd count: the middle age
    assert s["findings"] == {f: round(df[f].mean(), 3) for f in ("Cardiomegaly", "Effusion", "Nodule")}
    assert label_counts(t) == {"mix": {f: int(df[f].sum()) for f in ("No Finding", "Cardiomegaly", "Effusion", "Nodule")}}


def test_median_of_an_even_count_is_the_lower_middle_age():
    """The card's rule, now the plan table's too: an age some image has (32, 46, 60, 74 gives 46, not 53)."""
    import pyarrow as pa

    from chexforge.plan.summary import Composition

    def ages(values):
        return Composition.of(pa.table({"cohort": ["c"] * len(values), "sex": ["F"] * len(values),
                                        "view": ["PA"] * len(values), "age": pa.array(values, pa.int16())}))

    assert ages([74, 32, 60, 46]).cohorts["c"].age_median_range() == (46, 32, 74)
    assert ages([70, 70]).cohorts["c"].age_median_range() == (70, 70, 70)
    assert ages([5, None, 1, 3]).cohorts["c"].age_median_range() == (3, 1, 5)  # rows without an age left out
    assert ages([None]).cohorts["c"].age_median_range() is None


def test_a_manifest_counts_ok_rows_and_tallies_the_failed():
    import pyarrow as pa

    from chexforge.plan.summary import Composition, label_counts

    t = pa.table({"cohort": ["a", "b", "a", "b", "c"], "status": ["ok", "ok", "failed", "failed", "failed"],
                  "sex": ["F", "M", "M", "F", "F"], "view": ["PA", "AP", "AP", "AP", "PA"],
                  "age": pa.array([40, 50, 60, 70, 80], pa.int16()), "Nodule": pa.array([1, 0, 1, 1, 1], pa.int8())})
    comp = Composition.of(t)
    assert [(k, c.n, c.failed) for k, c in comp.cohorts.items()] == [("a", 1, 1), ("b", 1, 1), ("c", 0, 1)]
    assert comp.cohorts["a"].view == {"PA": 1} and comp.cohorts["a"].findings["Nodule"] == 1
    assert [k for k, _ in comp.counted()] == ["a", "b"]
    assert label_counts(t) == {"a": {"Nodule": 1}, "b": {}}  # b's ok row has no finding column set


# ---- patients and studies (issue 12, item 2) ---------------------------------------------------------

STUDY = """
name: s
seed: 4
cohorts:
  - name: pairs
    count: {n}
    study: {{views: [PA, LL]}}
    demographics:
      sex: {{F: 0.5, M: 0.5}}
      age: {{mean: 60, sd: 15, min: 20, max: 95}}
      race: {{Asian: 1, Black: 1, White: 1}}
    findings:
      Effusion: {{p: 0.5, laterality: [left, right, bilateral], severity: [small, large]}}
      Pneumothorax: 0.3
      Nodule: 0.3
      Cardiomegaly: 0.3
  - name: single
    count: 7
"""
PATIENT_COLUMNS = ["patient_id", "study_id", "patient_seed"]


def study_recipe(n: int):
    return parse_recipe(STUDY.format(n=n))


def test_a_study_cohort_gives_every_patient_each_view_with_the_same_findings():
    from chexforge.contracts.jobs import laterality_column, severity_column
    from chexforge.contracts.vocabulary import FINDING_NAMES, LATERAL_FINDINGS, SEVERITY_FINDINGS

    r = study_recipe(60)
    t = plan(r)
    assert r.cohorts[0].images == 120 and r.total == 127 and t.num_rows == 127
    pairs = t.filter(pc.equal(t.column("cohort"), "pairs")).to_pandas()
    assert len(pairs) == 120
    assert pairs["index"].tolist() == list(range(120))  # the image's index: study × 2 + the view's place
    assert pairs["view"].tolist() == ["PA", "LL"] * 60  # each study's views, in the order given
    shared = ["sex", "age", "race", *FINDING_NAMES, *(laterality_column(f) for f in LATERAL_FINDINGS),
              *(severity_column(f) for f in SEVERITY_FINDINGS), *PATIENT_COLUMNS]
    first, second = pairs.iloc[0::2].reset_index(drop=True), pairs.iloc[1::2].reset_index(drop=True)
    assert first[shared].fillna("-").equals(second[shared].fillna("-"))
    assert (first["job_id"] != second["job_id"]).all() and (first["seed"] != second["seed"]).all()
    assert pairs["job_id"].nunique() == 120 and pairs["seed"].nunique() == 120
    assert first["patient_id"].nunique() == first["study_id"].nunique() == first["patient_seed"].nunique() == 60
    assert pairs["patient_id"].str.fullmatch(r"P[0-9a-f]{16}").all()
    assert pairs["study_id"].str.fullmatch(r"S[0-9a-f]{16}").all()
    # The draws are per patient and real: findings with their sides and severities vary between studies.
    assert first["Effusion"].between(0, 1).all() and 10 < first["Effusion"].sum() < 50
    assert first["Effusion.laterality"].dropna().nunique() == 3 and first["sex"].nunique() == 2
    assert (pairs["prompt"].str.startswith("PA ") == (pairs["view"] == "PA")).all()  # each image's prompt names its view


def test_without_study_every_job_is_its_own_patient_and_study():
    t = plan(recipe(500))
    for name in PATIENT_COLUMNS:
        assert t.column(name).null_count == 0
        assert len(set(t.column(name).to_pylist())) == 500
    assert all(p.startswith("P") and s.startswith("S") for p, s in
               zip(t.column("patient_id").to_pylist(), t.column("study_id").to_pylist()))
    single = plan(study_recipe(3)).to_pandas().query("cohort == 'single'")
    assert single["patient_id"].nunique() == single["study_id"].nunique() == 7


def test_the_patient_columns_leave_the_existing_columns_as_they_were():
    """Adding patient_id, study_id and patient_seed changed no other column of an existing recipe's
    jobs (the digest was taken before they existed): a resumed run keeps its job ids and pixels."""
    import hashlib
    import json

    t = plan(recipe(300))
    cols = [c for c in t.column_names if c not in PATIENT_COLUMNS]
    blob = json.dumps(t.select(cols).to_pylist(), sort_keys=True, default=str).encode()
    assert hashlib.sha256(blob).hexdigest() == "ddd13bcbbd8683b1ca14aeb3413a1871a552e733de7650bbd87c65b55ff7a01f"


def test_study_plans_are_deterministic_chunk_in_whole_studies_and_grow_stably(tmp_path):
    import pyarrow as pa

    from chexforge.plan import iter_plan, plan_report

    r = study_recipe(25)
    whole = plan(r)
    assert table_bytes(whole) == table_bytes(plan(study_recipe(25)))
    chunks = list(iter_plan(r, chunk=5))
    pairs = [c for c in chunks if c.column("cohort")[0].as_py() == "pairs"]
    assert [c.num_rows for c in pairs] == [4] * 12 + [2]  # 2 studies (4 images) a chunk of at most 5 rows
    assert all(c.column("view").to_pylist()[0] == "PA" for c in pairs)
    assert pa.concat_tables(chunks).equals(whole.replace_schema_metadata(None))
    plan_report(r, tmp_path / "jobs.parquet", chunk=3)  # one study a chunk, streamed to the file
    write_jobs(whole, tmp_path / "whole.parquet")
    assert (tmp_path / "jobs.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    bigger = plan(study_recipe(40))
    assert bigger.slice(0, 50).equals(whole.slice(0, 50))  # raising the count adds studies, keeps these


def test_a_jobs_table_planned_before_the_patient_columns_reads_with_them_null(tmp_path):
    import pyarrow.parquet as pq

    from chexforge.contracts.jobs import JOB_COLUMNS
    from chexforge.errors import UserError
    from chexforge.runtime.jobs import JobSource

    t = plan(recipe(30))
    old = tmp_path / "old.parquet"
    pq.write_table(t.drop_columns(PATIENT_COLUMNS), old)
    back, meta = read_jobs(old)
    assert back.column_names == list(JOB_COLUMNS) and meta["name"] == "p"
    assert all(back.column(c).null_count == 30 for c in PATIENT_COLUMNS)
    assert back.drop_columns(PATIENT_COLUMNS).equals(t.drop_columns(PATIENT_COLUMNS))
    rows = [row for chunk in JobSource.from_parquet(old).chunks() for row in chunk.to_pylist()]
    assert len(rows) == 30 and rows[0]["patient_seed"] is None and rows[0]["job_id"] == t.column("job_id")[0].as_py()
    bad = t.set_column(t.schema.get_field_index("study_id"), "study_id", pa_strings(["X" * 17] * 30))
    write_jobs(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: row 1: column 'study_id': expected S and 16 hex digits"):
        read_jobs(tmp_path / "bad.parquet")


def pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())
