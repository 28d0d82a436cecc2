"""`--sample N`: a stratified, seeded sample of a plan (plan/subsample.py), made by the runtime.

`--limit N` takes the first N jobs of the first cohort; these tests check that `--sample N` is
proportional across cohorts (and across sex × findings within a cohort), the same for the same
seed and N, resumable, whole studies in study cohorts, and that a run makes exactly those jobs.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from chexforge.contracts.jobs import decode_job_ids
from chexforge.plan import plan, plan_report
from chexforge.plan.subsample import Strata, choose, collect, sample_of, shares
from chexforge.recipe import load_recipe
from chexforge.runtime import RunOptions, run
from tests.conftest import write

RECIPE = """
name: sample
seed: {seed}
backend: simulated
output: {{size: 64, formats: [png]}}
cohorts:
  - {{name: big, count: 600, demographics: {{sex: {{F: 0.3, M: 0.7}}}}, findings: {{Effusion: 0.25}}}}
  - {{name: mid, count: 300, findings: {{Nodule: 0.5}}}}
  - {{name: small, count: 100}}
  - {{name: tiny, count: 3}}
"""


def recipe(tmp_path, seed: int = 7, text: str = RECIPE):
    return load_recipe(write(tmp_path, text.format(seed=seed), f"r{seed}.yaml"))


def test_shares_are_largest_remainder():
    assert shares(np.array([600, 300, 100, 3]), 50).tolist() == [30, 15, 5, 0]  # 29.91, 14.96, 4.99, 0.15
    assert shares(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]  # ties: plan order
    assert shares(np.array([5, 2]), 100).tolist() == [5, 2]  # never more than a cohort has
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, rng.integers(1, 8))
        n = int(rng.integers(0, sizes.sum() + 2))
        got = shares(sizes, n)
        assert got.sum() == min(n, sizes.sum()) and (got <= sizes).all()
        if sizes.sum():
            assert (np.abs(got - n * sizes / sizes.sum()) < 1 + 1e-9).all()


def test_sample_is_proportional_across_cohorts_and_strata_and_deterministic(tmp_path):
    r = recipe(tmp_path)
    jobs = plan(r)
    chosen = sample_of(jobs.to_batches(max_chunksize=97), 100, r.seed)  # any chunking
    assert len(chosen) == 100 and np.array_equal(chosen, np.unique(chosen))
    table = jobs.to_pandas().assign(id=decode_job_ids(jobs.column("job_id")))
    picked = table[table["id"].isin(chosen)]
    assert picked["cohort"].value_counts().to_dict() == {"big": 60, "mid": 30, "small": 10}  # 59.8 29.9 9.97 0.30
    big, big_all = picked[picked.cohort == "big"], table[table.cohort == "big"]
    for (sex, eff), n in big_all.groupby(["sex", "Effusion"]).size().items():  # each stratum within one of its share
        got = int(((big.sex == sex) & (big.Effusion == eff)).sum())
        assert abs(got - 60 * n / 600) <= 1, (sex, eff, got, n)
    mid = picked[picked.cohort == "mid"]
    assert abs(int(mid.Nodule.sum()) - 30 * table[table.cohort == "mid"].Nodule.mean()) <= 1
    # The same seed and N: the same jobs; another seed or N: others (the first N of plan order is not it).
    assert np.array_equal(sample_of(jobs.to_batches(max_chunksize=4096), 100, r.seed), chosen)
    assert not np.array_equal(sample_of(jobs.to_batches(), 100, r.seed + 1), chosen)
    assert set(picked.cohort) != {"big"} and len(set(chosen) & set(table["id"][:100])) < 90
    assert len(sample_of(jobs.to_batches(), 5000, r.seed)) == jobs.num_rows  # N beyond the plan: all of it
    assert len(sample_of(jobs.to_batches(), 0, r.seed)) == 0


def test_study_cohorts_are_sampled_by_whole_studies(tmp_path):
    text = RECIPE.replace("  - {{name: tiny, count: 3}}\n",
                          "  - {{name: studies, count: 100, study: {{views: [PA, LL]}}}}\n")
    r = recipe(tmp_path, text=text)
    jobs = plan(r)
    chosen = sample_of(jobs.to_batches(), 110, r.seed)
    table = jobs.to_pandas().assign(id=decode_job_ids(jobs.column("job_id")))
    picked = table[table["id"].isin(chosen)]
    studies = picked[picked.cohort == "studies"]
    assert len(studies) == 2 * studies.study_id.nunique() == 18  # 200/1200 × 110 = 18.3 jobs → 9 studies
    assert all(sorted(views) == ["LL", "PA"] for _, views in studies.groupby("study_id").view)


def test_choose_on_handmade_strata():
    """Two cohorts of 10, one of them split 8/2 between two strata: 10 of 20 gives 5 and 5, and the
    small stratum 1 (its share), whatever the seed."""
    ids = np.arange(1, 21, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    strata = Strata(ids, np.repeat(np.array([0, 1], dtype=np.int32), 10), ["a", "b"],
                    np.array([0] * 10 + [0] * 8 + [1] * 2, dtype=np.int64), ids)
    for seed in range(20):
        got = np.isin(ids, choose(strata, 10, seed))
        assert got[:10].sum() == 5 and got[10:].sum() == 5 and got[18:].sum() == 1


def test_a_sampled_run_makes_exactly_the_sample_and_resumes_it(tmp_path):
    r = recipe(tmp_path, text=RECIPE.replace("600", "60").replace("300", "30").replace("count: 100", "count: 10"))
    jobs = plan(r)
    chosen = sample_of(jobs.to_batches(), 12, r.seed)
    out = tmp_path / "out"
    first = run(jobs, r, out, RunOptions(sample=12, limit=5, progress=False))  # --limit still bounds the run
    assert (first.planned, first.generated) == (12, 5)
    second = run(jobs, r, out, RunOptions(sample=12, progress=False))
    assert (second.planned, second.skipped, second.generated) == (12, 5, 7)
    made = decode_job_ids(pq.read_table(out / "manifest.parquet").column("job_id"))
    assert np.array_equal(np.sort(made), chosen)
    assert len(list((out / "images").rglob("*.png"))) == 12
    third = run(jobs, r, out, RunOptions(sample=12, progress=False))
    assert (third.skipped, third.generated) == (12, 0)
    whole = run(jobs, r, out, RunOptions(limit=1, progress=False))  # the full plan takes the sample as done
    assert (whole.planned, whole.skipped, whole.generated) == (jobs.num_rows, 12, 1)


def test_cli_plan_and_generate_sample(tmp_path, capsys, monkeypatch):
    """In process (chexforge.cli.main), to keep the test quick: the commands are the same."""
    from chexforge.cli import main

    path = write(tmp_path, RECIPE.format(seed=3).replace("600", "60").replace("300", "30").replace("count: 100", "count: 10"))
    jobs_file = tmp_path / "jobs.parquet"
    assert main(["plan", str(path), "--sample", "20", "--out", str(jobs_file)]) == 0
    planned = decode_job_ids(pq.read_table(jobs_file).column("job_id"))
    r = load_recipe(path)
    assert np.array_equal(np.sort(planned), sample_of(plan(r).to_batches(), 20, r.seed))
    assert plan_report(r, sample=20).jobs == 20
    assert main(["generate", str(path), "--out", str(tmp_path / "o"), "--sample", "20", "--no-progress"]) == 0
    made = decode_job_ids(pq.read_table(tmp_path / "o" / "manifest.parquet").column("job_id"))
    assert np.array_equal(np.sort(made), np.sort(planned))
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "400")
    main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "so not a sample of the dataset; see --sample" in help_text and "stratified, seeded sample" in help_text
    assert main(["generate", str(path), "--out", str(tmp_path / "o"), "--sample", "-1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("n", [1, 7, 50])
def test_collect_reads_every_column_it_needs_from_a_plan(tmp_path, n):
    r = recipe(tmp_path)
    s = collect(plan(r).to_batches(max_chunksize=n * 13))
    assert s.cohorts == ["big", "mid", "small", "tiny"] and len(s.ids) == 1003
    assert len(np.unique(s.unit)) == len(s.ids)  # no study cohort: each job its own study
    assert len(np.unique(s.stratum[s.cohort == 0])) == 4  # big: F/M × Effusion or not
