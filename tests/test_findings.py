"""The findings: the statistics that decide against naive references written here (every sign
pattern, every split, Holm by hand), each verdict branch chosen from constructed numbers, the
categories without components kept apart, the base-vs-tuned and "moved more" tests on
constructed inputs, and every verdict of a real tiny-model run recomputed from summary.json."""

from __future__ import annotations

import json
from itertools import combinations, product
from math import comb
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from sparcom.ablation.report import criticality_tests, summarize_ablation
from sparcom.ablation.statistics import (ablation_figures, holm, paired_difference, sign_flip_test,
                                         two_sample_test)
from sparcom.comparison.report import focus_verdict
from sparcom.findings.report import SECTION, write_findings

GROUPS = ["CLS", "CODE", "MATH"]


# --- the statistics against naive references --------------------------------------------------

def naive_sign_flip_p(values: list[float]) -> float:
    observed = sum(values) / len(values)
    means = [sum(s * v for s, v in zip(signs, values)) / len(values) for signs in product([-1, 1], repeat=len(values))]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def naive_two_sample_p(own: list[float], others: list[float]) -> float:
    pooled = own + others
    observed = np.mean(own) - np.mean(others)
    stats = []
    for chosen in combinations(range(len(pooled)), len(own)):
        inside = [pooled[i] for i in chosen]
        outside = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        stats.append(np.mean(inside) - np.mean(outside))
    return sum(s >= observed - 1e-12 for s in stats) / len(stats)


@pytest.mark.parametrize("values", [[0.5, 0.3, -0.1, 0.4, 0.2], [1.0] * 8, [0.2, -0.2, 0.2, -0.2], [-1.0, -2.0, 0.5]])
def test_sign_flips_are_enumerated_exactly(values):
    p, smallest = sign_flip_test(np.array(values), permutations=10, rng=np.random.default_rng(0))
    assert p == pytest.approx(naive_sign_flip_p(values), abs=1e-12)
    assert smallest == 2.0 ** -len(values)


def test_sign_flips_over_many_records_are_sampled_near_the_exact_p():
    values = list(np.random.default_rng(3).normal(0.15, 1.0, size=18))
    p, smallest = sign_flip_test(np.array(values), permutations=20000, rng=np.random.default_rng(1))
    assert abs(p - naive_sign_flip_p(values)) < 0.015
    assert smallest == 1 / 20001  # 2^-18 is smaller than what 20000 random patterns can show


@pytest.mark.parametrize(("own", "others"), [([3.0, 2.5, 2.8], [0.1, 0.4, 0.0, 0.3]),
                                             ([0.2, 0.1], [0.3, 0.0, 0.2]), ([1.0, 1.0], [1.0, 1.0, 1.0])])
def test_two_sample_test_enumerates_every_split(own, others):
    p, smallest = two_sample_test(np.array(own), np.array(others), permutations=1000, rng=np.random.default_rng(0))
    assert p == pytest.approx(naive_two_sample_p(own, others), abs=1e-12)
    assert smallest == 1 / comb(len(own) + len(others), len(own))


def test_two_sample_test_samples_when_the_splits_are_many():
    rng = np.random.default_rng(5)
    own, others = list(rng.normal(0.3, 1, 5)), list(rng.normal(0, 1, 9))  # C(14, 5) = 2002 splits
    p, smallest = two_sample_test(np.array(own), np.array(others), permutations=1000, rng=np.random.default_rng(2))
    assert abs(p - naive_two_sample_p(own, others)) < 0.04
    assert smallest == 1 / 1001


def test_holm_on_known_p_values():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, and never below an earlier adjusted p


def test_paired_difference_on_shared_records():
    before = {"a": 1.0, "b": 2.0, "c": 3.0, "gone": 5.0}
    after = {"a": 2.0, "b": 3.5, "c": 3.5, "new": 9.0}
    result = paired_difference(before, after, resamples=2000, permutations=100, seed=0)
    assert result["records"] == 3 and result["value"] == pytest.approx(1.0)
    # two-sided: twice the smaller one-sided p of the differences 1.0, 1.5, 0.5 (exact, 8 patterns)
    assert result["p_value"] == pytest.approx(min(1, 2 * min(naive_sign_flip_p([1.0, 1.5, 0.5]),
                                                              naive_sign_flip_p([-1.0, -1.5, -0.5]))))
    assert result["min_p"] == 0.25
    assert 0.5 <= result["low"] <= result["value"] <= result["high"] <= 1.5


# --- constructed ablations ---------------------------------------------------------------------

def constructed_ablation(own_effect: dict, other_effect: dict, control_effect: dict, records: int,
                         extra: dict | None = None, seed: int = 0) -> xr.Dataset:
    """An ablation.zarr as the stage writes it, from chosen effects: switching off g's set raises
    the NLL of g's records by own_effect[g], other groups' by other_effect[g], and the
    frequency-matched control raises g's by control_effect[g]; each plus record noise (sd 0.05).
    `extra`: a category without components and the effect every set has on it."""
    rng = np.random.default_rng(seed)
    labels = np.array([g for g in GROUPS for _ in range(records)] + [c for c in (extra or {}) for _ in range(records)])
    base = 2 + rng.random(len(labels))
    nll = np.array([[base[i] + (own_effect[g] if label == g else (extra or {}).get(label, other_effect[g]))
                     + rng.normal(0, 0.05) for i, label in enumerate(labels)] for g in GROUPS])
    control = np.array([[[base[i] + (control_effect[g] if label == g else 0.0) + rng.normal(0, 0.05)
                          for i, label in enumerate(labels)] for g in GROUPS]])[None]
    dataset = xr.Dataset(
        {"nll_base": ("instruction", base), "nll": (("ablated", "instruction"), nll),
         "nll_control": (("control", "seed", "ablated", "instruction"), control),
         "ablated_size": ("ablated", np.array([40, 30, 20])),
         "mean_frequency": ("ablated", np.full(3, 0.1)),
         "control_mean_frequency": (("control", "seed", "ablated"), np.full((1, 1, 3), 0.1))},
        coords={"ablated": GROUPS, "control": ["frequency_matched"], "seed": [0],
                "category": ("instruction", labels), "origin": ("instruction", np.full(len(labels), "ai")),
                "record_hash": ("instruction", np.array([f"h{i}" for i in range(len(labels))]))},
        attrs={"group_by": "category", "family": "neurons", "rule": "global_percentile", "seeds": 1, "seed": 0,
               "resamples": 1000, "permutations": 2000})
    figures = ablation_figures(dataset.nll_base, dataset.nll, dataset.nll_control, labels, 1000, 2000, 0)
    return xr.merge([dataset, figures])


def write_run(run_dir: Path, ablation: xr.Dataset, gap: list[float], null_q95: list[float] | None,
              rule: str = "global_percentile") -> Path:
    """A rule's run folder with what the findings read: summary.json (with the split-half rows as
    identification's report writes them) and ablation.json."""
    run_dir.mkdir(parents=True)
    sizes = {g: int(s) for g, s in zip(GROUPS, ablation.ablated_size.values)}
    split_half = {g: {"gap": gap[i], "null_q95": None if null_q95 is None else null_q95[i],
                      "p": None if null_q95 is None else 0.005, "permutations": 0 if null_q95 is None else 200,
                      "reproducible": None if null_q95 is None else gap[i] > null_q95[i],
                      "undecided": "no null in these components" if null_q95 is None else None}
                  for i, g in enumerate(GROUPS)}
    (run_dir / "summary.json").write_text(json.dumps({
        "rule": rule, "groups": GROUPS, "families": {"neurons": {"set_size": sizes, "split_half": split_half}}}))
    (run_dir / "ablation.json").write_text(json.dumps({**summarize_ablation(ablation), "rule": rule}))
    (run_dir / "report.md").write_text("# SPARCOM: instruction-specific components\n\nIntro.\n\n## Neurons\n\nTable.\n")
    return run_dir


def test_each_verdict_branch_is_chosen_by_the_numbers(tmp_path):
    # CLS: own 2.0, others 0.1, control 0.3 -> causal and specific; CODE: own 1.0, others 1.0,
    # control 0.1 -> causal, not specific (own - others ~ 0: interval spans 0, or at/below 0);
    # MATH: own 0.2, others 0.2, control 0.8 -> not causal (interval below 0)
    ablation = constructed_ablation({"CLS": 2.0, "CODE": 1.0, "MATH": 0.2}, {"CLS": 0.1, "CODE": 1.0, "MATH": 0.2},
                                    {"CLS": 0.3, "CODE": 0.1, "MATH": 0.8}, records=8)
    summary = summarize_ablation(ablation)
    causal = {g: summary["per_group"][g]["controls"]["frequency_matched"] for g in GROUPS}
    specific = {g: summary["per_group"][g]["specific"] for g in GROUPS}
    assert [causal[g]["decision"] for g in GROUPS] == ["yes", "yes", "no"]
    assert specific["CLS"]["decision"] == "yes" and specific["CODE"]["decision"] != "yes"
    # the numbers behind them: 8 records, all 256 sign patterns; Holm over 3 groups
    assert causal["CLS"]["min_p"] == 2 ** -8 and causal["CLS"]["p_value"] == 2 ** -8
    assert causal["CLS"]["p_adjusted"] == pytest.approx(3 * 2 ** -8)
    assert causal["MATH"]["difference"]["high"] <= 0
    cls = ablation.sel(ablated="CLS")
    own = (cls.nll - cls.nll_base).values[ablation.category.values == "CLS"]
    control = (cls.nll_control.sel(control="frequency_matched", seed=0) - cls.nll_base).values[
        ablation.category.values == "CLS"]
    assert causal["CLS"]["difference"]["value"] == pytest.approx(np.mean(own - control), abs=1e-5)

    run = write_run(tmp_path / "run", ablation, gap=[0.2, 0.15, 0.01], null_q95=[0.05, 0.05, 0.05])
    result = write_findings([run])
    verdict = result["verdicts"]["global_percentile"]
    assert verdict.startswith("`global_percentile` (neurons): reproducible for 2 of 3 (CLS, CODE); "
                              "causal for 2 of 3 (CLS, CODE); specific for 1 of 3 (CLS)")
    assert "not above its null: MATH" in verdict and "not causal: MATH" in verdict
    report = (run / "report.md").read_text()
    assert report.index(SECTION) < report.index("## Neurons") and report.count(SECTION) == 1
    # 8 records: 2^-8; own against 16 others: C(24, 8) splits, 2000 drawn: 1/2001
    assert ("- `global_percentile`: smallest p the tests could reach: causal 0.0039 (3 x 0.0039 = 0.012 after "
            "Holm), specific 0.0005 (3 x 0.0005 = 0.0015 after Holm).") in report
    write_findings([run])  # a rerun replaces the section
    assert (run / "report.md").read_text().count(SECTION) == 1
    saved = json.loads((run / "summary.json").read_text())["findings"]
    assert saved == json.loads(json.dumps(result))
    # rules side by side: each rule's report holds every rule's rows and verdicts
    other = write_run(tmp_path / "lape", ablation, gap=[0.01, 0.01, 0.01], null_q95=[0.05] * 3, rule="lape")
    both = write_findings([run, other])
    assert list(both["verdicts"]) == ["global_percentile", "lape"]
    assert both["verdicts"]["lape"].startswith("`lape` (neurons): reproducible for 0 of 3;")
    assert "| `lape` | neurons | CLS |" in (run / "report.md").read_text()
    assert json.loads((other / "summary.json").read_text())["findings"] == json.loads(json.dumps(both))
    assert saved["rows"][0]["reproducible"] == {"gap": 0.2, "null_q95": 0.05, "p_value": 0.005, "decision": "yes",
                                                "reason": "gap above the null's 95th percentile"}


def test_too_few_records_is_undecided_whatever_the_effect(tmp_path):
    # an effect as large as CLS's above, but 3 records: sign flips cannot go below 1/8
    ablation = constructed_ablation({"CLS": 2.0, "CODE": 1.0, "MATH": 0.2}, {"CLS": 0.1, "CODE": 1.0, "MATH": 0.2},
                                    {"CLS": 0.3, "CODE": 0.1, "MATH": 0.8}, records=3)
    summary = summarize_ablation(ablation)
    for group in GROUPS:
        test = summary["per_group"][group]["controls"]["frequency_matched"]
        assert test["decision"] == "undecided" and test["min_p"] == 1 / 8
        assert test["reason"].startswith("too few records: the smallest p this test can reach is 0.12")
    run = write_run(tmp_path / "run", ablation, gap=[0.2, 0.15, 0.01], null_q95=None)
    verdict = write_findings([run])["verdicts"]["global_percentile"]
    assert "causal for 0 of 3" in verdict and "not causal" not in verdict
    assert "undecided, reproducible: no null in these components: CLS, CODE, MATH" in verdict
    assert "undecided, causal: too few records" in verdict


def test_categories_without_components_are_kept_apart(tmp_path):
    # every set raises SUM's NLL by 5: mixed into "others" it would hide CLS's specificity
    ablation = constructed_ablation({"CLS": 2.0, "CODE": 1.0, "MATH": 0.2}, {"CLS": 0.1, "CODE": 1.0, "MATH": 0.2},
                                    {"CLS": 0.3, "CODE": 0.1, "MATH": 0.8}, records=8, extra={"SUM": 5.0})
    labels = ablation.category.values
    change = (ablation.nll - ablation.nll_base).sel(ablated="CLS").values
    others = np.isin(labels, ["CODE", "MATH"])
    assert float(ablation.delta_other.sel(ablated="CLS")) == pytest.approx(change[others].mean())
    assert float(ablation.specific_difference.sel(ablated="CLS")) == pytest.approx(
        change[labels == "CLS"].mean() - change[others].mean())
    assert float(ablation.delta.sel(ablated="CLS", evaluated="SUM")) == pytest.approx(change[labels == "SUM"].mean())
    summary = summarize_ablation(ablation)
    assert summary["apart"] == ["SUM"] and summary["per_group"]["CLS"]["specific"]["others"] == ["CODE", "MATH"]
    assert summary["per_group"]["CLS"]["specific"]["other_records"] == 16
    run = write_run(tmp_path / "run", ablation, gap=[0.2, 0.15, 0.01], null_q95=[0.05] * 3)
    result = write_findings([run])
    assert result["apart"] == {"global_percentile": ["SUM"]}
    assert "- `global_percentile`: SUM" in (run / "report.md").read_text()


# --- the comparison's tests --------------------------------------------------------------------

def test_base_against_tuned_is_a_paired_test_over_shared_records():
    rng = np.random.default_rng(0)
    hashes = [f"h{i}" for i in range(8)]
    base_changes = {g: dict(zip(hashes, rng.random(8) + 1)) for g in GROUPS}
    tuned_changes = {"CLS": {h: v + 1.0 + rng.normal(0, 0.05) for h, v in base_changes["CLS"].items()},
                     "CODE": {h: v + s for (h, v), s in zip(base_changes["CODE"].items(), [0.3, -0.3] * 4)},
                     "MATH": {h: v + 1.0 for h, v in list(base_changes["MATH"].items())[:3]}}

    def summary(changes):
        return {"groups": GROUPS, "seed": 0, "resamples": 1000, "permutations": 1000,
                "per_group": {g: {"own_changes": changes[g]} for g in GROUPS}}

    tests = criticality_tests(summary(base_changes), summary(tuned_changes))
    differences = [tuned_changes["CLS"][h] - base_changes["CLS"][h] for h in hashes]
    assert tests["CLS"]["value"] == pytest.approx(np.mean(differences))
    assert tests["CLS"]["p_value"] == pytest.approx(2 * naive_sign_flip_p(differences))  # 2 x 2^-8
    assert tests["CLS"]["verdict"] == "more critical"
    assert tests["CODE"]["verdict"] == "undecided (interval spans 0)"
    assert tests["MATH"]["records"] == 3 and tests["MATH"]["verdict"].startswith("undecided (3 shared records")


def test_moved_more_is_undecided_when_labelings_are_too_few():
    groups = ["CLS", "CODE", "GEN", "MATH", "QA", "SUM"]
    turnover = dict(zip(groups, [0.30, 0.29, 0.10, 0.11, 0.12, 0.13]))
    verdict = focus_verdict({"turnover": turnover}, ["CLS", "CODE"])
    measure = verdict["measures"]["turnover"]
    assert measure["labelings"] == 15 and measure["p_value"] == pytest.approx(1 / 15)  # the top two: the best p
    assert verdict["answer"] == "undecided" and "only 15 labelings, so p cannot go below 0.067" in verdict["reason"]


def test_moved_more_says_yes_when_the_labelings_allow_it():
    groups = [f"G{i}" for i in range(8)]  # 3 of 8 fine-tuned: C(8, 3) = 56 labelings
    turnover = dict(zip(groups, [0.9, 0.8, 0.7, 0.1, 0.2, 0.15, 0.05, 0.12]))
    mixed = dict(zip(groups, [0.5, 0.1, 0.4, 0.2, 0.3, 0.15, 0.05, 0.12]))
    naive = [np.mean([mixed[g] for g in chosen]) - np.mean([mixed[g] for g in groups if g not in chosen])
             for chosen in combinations(groups, 3)]
    observed = np.mean([0.5, 0.1, 0.4]) - np.mean([0.2, 0.3, 0.15, 0.05, 0.12])
    naive_p = np.mean(np.array(naive) >= observed - 1e-12)
    assert naive_p > 0.05
    verdict = focus_verdict({"turnover": turnover, "mean_abs_delta": mixed}, ["G0", "G1", "G2"])
    assert verdict["measures"]["mean_abs_delta"]["p_value"] == pytest.approx(naive_p)
    assert verdict["measures"]["turnover"]["p_value"] == pytest.approx(1 / 56)  # the top three
    assert verdict["answer"] == "undecided" and verdict["reason"] == "not every measure's p is below 0.05"
    verdict = focus_verdict({"turnover": turnover, "mean_abs_delta": turnover}, ["G0", "G1", "G2"])
    assert verdict["answer"] == "yes"


# --- a real run, every verdict recomputed ------------------------------------------------------

def recomputed(test: dict, groups_tested: int) -> str:
    """The verdict rule of docs/method.md section 6b, on the numbers summary.json shows."""
    figure = test["difference"]
    if figure is None or test["p_adjusted"] is None:
        return "undecided"
    if groups_tested * test["min_p"] >= 0.05:
        return "undecided"
    if test["p_adjusted"] < 0.05 and figure["low"] > 0:
        return "yes"
    return "no" if figure["high"] <= 0 else "undecided"


def test_every_verdict_of_a_real_run_follows_from_its_numbers(tmp_path, identified, cache_dir):
    from sparcom.ablation.ablate import run_ablation
    from sparcom.ablation.report import report_ablation
    from sparcom.ablation.settings import AblationSettings
    from sparcom.extraction.settings import ExtractionSettings
    from sparcom.identification.report import report_generality

    work, store, components, _ = identified
    run_dir = tmp_path / "run"
    report_generality(components, run_dir)
    path = run_ablation(components, store, AblationSettings(resamples=200, permutations=500, max_response_tokens=4),
                        ExtractionSettings(), cache_dir, run_dir)
    report_ablation(path, run_dir)
    write_findings([run_dir])
    findings = json.loads((run_dir / "summary.json").read_text())["findings"]
    rows = findings["rows"]
    assert {r["group"] for r in rows} == set(json.loads((run_dir / "summary.json").read_text())["groups"])
    for test in ("causal", "specific"):
        tested = [r for r in rows if r["ablated"] and r[test]["p_value"] is not None]
        adjusted = holm([r[test]["p_value"] for r in tested])
        for row, p in zip(tested, adjusted):
            assert row[test]["p_adjusted"] == pytest.approx(p)
            assert row[test]["decision"] == recomputed(row[test], len(tested)), (test, row["group"])
            # 8 records per group by default: 2^-8; own against 40 others: C(48, 8) splits, 500 drawn
            assert row[test]["min_p"] == (2.0 ** -8 if test == "causal" else 1 / 501)
    for row in rows:
        reproducible = row["reproducible"]
        expected = ("undecided" if reproducible["gap"] is None or reproducible["null_q95"] is None
                    else "yes" if reproducible["gap"] > reproducible["null_q95"] else "no")
        assert reproducible["decision"] == expected
    family = next(r["family"] for r in rows if r["ablated"])
    counted = [r for r in rows if r["family"] == family]
    verdict = findings["verdicts"][rows[0]["rule"]]
    for test in ("reproducible", "causal", "specific"):
        assert f"{test} for {sum(r[test]['decision'] == 'yes' for r in counted)} of {len(counted)}" in verdict
    report = (run_dir / "report.md").read_text()
    assert report.split("\n## ")[1].startswith(SECTION.removeprefix("## "))
    # before the findings only the title, what was selected how and what was left out: no table
    # (the template share is a section of its own)
    preamble = report.split("\n## ")[0].strip().split("\n\n")
    assert [part.split(" ")[0] for part in preamble[:3]] == ["#", "Model", "Selection:"], preamble
    assert not any(line.startswith("|") for line in report.split("\n## ")[0].splitlines())
    assert "template_share" in json.loads((run_dir / "summary.json").read_text())
    assert "\n## The chat template's share of the counts\n" in report
