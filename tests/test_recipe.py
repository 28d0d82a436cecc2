"""Recipe schema and loader: good recipes load, each class of mistake gets one located line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from chexforge.errors import UserError
from chexforge.recipe import load_recipe, parse_recipe, recipe_to_yaml

from .conftest import ROOT, write

GOOD = """
name: t
seed: 1
cohorts:
  - name: a
    count: 10
    view: {PA: 3, AP: 1}
    demographics:
      sex: F
      age: {mean: 60, sd: 10, min: 30, max: 90}
      race: {Asian: 1, Black: 1, White: 2}
    findings:
      Effusion: {p: 0.5, laterality: [left]}
"""


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    r = load_recipe(path)
    assert r.total > 0


def test_defaults_and_normalisation(tmp_path):
    text = GOOD.replace("laterality: [left]", "laterality: left")
    r = load_recipe(write(tmp_path, text))
    c = r.cohorts[0]
    assert c.view == {"PA": 0.75, "AP": 0.25}
    assert c.demographics.sex == {"F": 1.0}
    assert c.findings["Effusion"].laterality == {"left": 1.0}
    assert r.output.size == 256 and r.output.formats == ["png", "dicom"]
    assert c.masks is None  # the backend default (DRR: lungs, heart) applies at planning


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, GOOD.replace("laterality: [left]", "laterality: left")))
    again = parse_recipe(recipe_to_yaml(r))
    assert again.model_dump() == r.model_dump()


def test_shorthands(tmp_path):
    r = load_recipe(write(tmp_path, """
        name: s
        cohorts:
          - name: a
            count: 3
            demographics: {age: 70}
            findings: {Nodule: true, Mass: 0.25, Pleural Effusion: {severity: small}}
          - name: b
            count: 3
            demographics: {age: [20, 40]}
          - name: c
            count: 3
            demographics: {age: {bins: {"18-39": 1, "80+": 1}}}
    """))
    a, b, c = r.cohorts
    assert a.demographics.age.fixed == 70
    assert a.findings["Nodule"].p == 1.0 and a.findings["Mass"].p == 0.25
    assert "Effusion" in a.findings  # alias of "Pleural Effusion"
    assert b.demographics.age.range == (20, 40)
    assert c.demographics.age.bins == {"18-39": 0.5, "80+": 0.5}


# Each bad recipe: (what to change in GOOD, line:col expected, words the message must hold)
BAD = [
    ("syntax", GOOD.replace("count: 10", "count: [10"), r":\d+:\d+: YAML syntax error"),
    ("unknown key", GOOD.replace("    view:", "    veiw:"), r":6:5: cohorts\[0\].veiw: unknown key 'veiw'; did you mean 'view'\?"),
    ("unknown nested key", GOOD.replace("sex: F", "sexx: F"), r":8:7: cohorts\[0\].demographics.sexx: unknown key 'sexx'; did you mean 'sex'\?"),
    ("wrong type", GOOD.replace("count: 10", "count: ten"), r":5:12: cohorts\[0\].count: expected a valid integer"),
    ("out of range", GOOD.replace("seed: 1", "seed: -3"), r":2:7: seed: expected greater than or equal to 0"),
    ("unknown finding", GOOD.replace("Effusion:", "Efusion:"), r":12:7: cohorts\[0\].findings.Efusion: unknown finding 'Efusion'; did you mean 'Effusion'\?"),
    ("bad laterality", GOOD.replace("laterality: [left]", "laterality: up"), r":12:\d+: cohorts\[0\].findings.Effusion.laterality: unknown laterality 'up'"),
    ("bad sex", GOOD.replace("sex: F", "sex: X"), r":8:\d+: cohorts\[0\].demographics.sex: unknown sex 'X'; expected one of F, M"),
    ("probability", GOOD.replace("p: 0.5", "p: 1.5"), r":12:\d+: cohorts\[0\].findings.Effusion.p: expected less than or equal to 1"),
    ("missing key", GOOD.replace("    count: 10\n", ""), r":4:5: cohorts\[0\].count: missing required key 'count'"),
    ("age forms", GOOD.replace("age: {mean: 60, sd: 10, min: 30, max: 90}", "age: {mean: 60}"), r"cohorts\[0\].demographics.age: an age with a mean needs an sd"),
    ("unknown backend", GOOD.replace("seed: 1", "seed: 1\nbackend: gan"), r":3:10: backend: unknown backend 'gan'"),
    ("backend option", GOOD.replace("seed: 1", "seed: 1\nbackend_options: {dose: -1}"), r"backend_options.dose: .*greater than 0.05"),
    ("duplicate cohort", GOOD + GOOD[GOOD.index("  - name: a"):], r"cohorts\[1\].name: cohort name 'a' is used twice"),
    ("no finding contradiction", GOOD.replace("findings:\n", "findings:\n      No Finding: true\n"),
     r"'No Finding' contradicts Effusion"),
    ("prompt field", GOOD.replace("    view:", "    prompt: '{age} {colour}'\n    view:"), r"unknown prompt field \{colour\}"),
    ("not a mapping", "- just\n- a list\n", r":1:1: expected a YAML mapping"),
    ("view and study", GOOD.replace("    view: {PA: 3, AP: 1}\n", "    view: {PA: 3, AP: 1}\n    study: {views: [PA, LL]}\n"),
     r":7:5: cohorts\[0\].study: give either view or study, not both"),
    ("study view twice", GOOD.replace("    view: {PA: 3, AP: 1}\n", "    study: {views: [PA, LL, PA]}\n"),
     r":6:\d+: cohorts\[0\].study.views: a study takes each view once; PA is given twice"),
    ("unknown study view", GOOD.replace("    view: {PA: 3, AP: 1}\n", "    study: {views: [PA, lateral]}\n"),
     r":6:\d+: cohorts\[0\].study.views: unknown view 'lateral'; expected one of PA, AP, LL"),
    ("empty study", GOOD.replace("    view: {PA: 3, AP: 1}\n", "    study: {views: []}\n"),
     r":6:\d+: cohorts\[0\].study.views: a study has 1 to 4 views, not 0"),
    ("too many study images", GOOD.replace("count: 10", "count: 60000000").replace("    view: {PA: 3, AP: 1}\n", "    study: [PA, LL]\n"),
     r":5:12: cohorts\[0\].count: 60000000 studies of 2 views are 120000000 images; a cohort makes at most 100000000"),
    ("children for an adult-CT backend", GOOD.replace("age: {mean: 60, sd: 10, min: 30, max: 90}", "age: [5, 40]"),
     r":9:\d+: cohorts\[0\].demographics.age: the drr backend makes patients aged 18-120 years; this cohort's ages reach 5"),
]


@pytest.mark.parametrize("label,text,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_point_at_the_place(tmp_path, label, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    line = info.value.line()
    assert "\n" not in line
    assert line.startswith(str(path)), line
    assert re.search(pattern, line), line


def test_a_finding_the_backend_cannot_render_points_at_the_place(tmp_path, monkeypatch):
    # Every built-in backend renders the whole vocabulary now, so narrow one for the check.
    import dataclasses

    from chexforge.contracts import backends as registry

    narrow = dataclasses.replace(registry.BACKENDS["drr"], findings=("No Finding", "Effusion"))
    monkeypatch.setitem(registry.BACKENDS, "drr", narrow)
    path = write(tmp_path, GOOD.replace("Effusion:", "Pneumonia:").replace("laterality: [left]", "laterality: left"))
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert re.search(r":12:7: cohorts\[0\].findings.Pneumonia: the drr backend cannot render 'Pneumonia' yet",
                     info.value.line())


def test_cli_reports_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, GOOD.replace("Effusion:", "Efusion:"))
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "did you mean 'Effusion'" in lines[0] and "Traceback" not in proc.stderr


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


# ---- studies: several images of one patient ----------------------------------------------------------

STUDY = GOOD.replace("    view: {PA: 3, AP: 1}\n", "    study: {views: [PA, LL]}\n")


def test_a_study_counts_patients_and_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, STUDY))
    c = r.cohorts[0]
    assert c.view is None and c.study.views == ["PA", "LL"]
    assert c.count == 10 and c.images == 20 and r.total == 20
    assert c.view_mix == {"PA": 0.5, "LL": 0.5}
    again = parse_recipe(recipe_to_yaml(r))  # the resolved recipe (a jobs table's) has no view: it loads
    assert again.model_dump() == r.model_dump()
    short = parse_recipe(STUDY.replace("study: {views: [PA, LL]}", "study: [PA, LL]"))
    assert short.cohorts[0].study == c.study
    plain = parse_recipe(GOOD.replace("    view: {PA: 3, AP: 1}\n", ""))
    assert plain.cohorts[0].view == {"PA": 1.0} and plain.cohorts[0].study is None and plain.total == 10


def test_a_study_view_the_backend_cannot_render_points_at_it(tmp_path, monkeypatch):
    import dataclasses

    from chexforge.contracts import backends as registry

    monkeypatch.setitem(registry.BACKENDS, "drr", dataclasses.replace(registry.BACKENDS["drr"], views=("PA", "AP")))
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, STUDY))
    assert re.search(r":6:\d+: cohorts\[0\].study.views\[1\]: the drr backend renders views PA, AP, not 'LL'",
                     info.value.line()), info.value.line()


def test_view_and_study_together_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, GOOD.replace("    view: {PA: 3, AP: 1}\n", "    view: {PA: 3, AP: 1}\n    study: {views: [PA, LL]}\n"))
    proc = subprocess.run([sys.executable, "-m", "chexforge.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert re.search(re.escape(str(path)) + r":7:5: cohorts\[0\].study: give either view or study, not both", lines[0]), lines[0]
