"""--recipe accurate: the candidates tried on held-out calibration samples, the choice, the budget, the report,
and the usage errors. The digits CNN with few samples keeps it short."""
import json
import time

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, DIGITS_DATA, invoke, one_line_error

from onnxprune.api import CalibrationSource, Options, Target, prune
from onnxprune import recipe
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.recipe import STRONG, Candidate, Costs, best_of, candidate_list, holdout_split, why_chosen
from onnxprune.verify import session

SAMPLES = 24  # 18 fit the candidates, 6 judge them


def recipe_candidate(entry: dict) -> Candidate:
    return Candidate(*[entry[k] for k in recipe.SEARCHED])


def accurate(budget: float = 600.0, **options) -> Options:
    return Options(recipe="accurate", recipe_budget=budget, calib=CalibrationSource(DIGITS_CALIB, size=SAMPLES),
                   **options)


@pytest.fixture(scope="module")
def searched():
    """The digits CNN pruned to half its MACs by the accurate recipe, every candidate tried."""
    return prune(str(DIGITS), Target.macs(0.5), accurate())


def test_the_choice_is_the_lowest_held_out_error_among_candidates_that_meet_the_target(searched):
    _, report = searched
    recipe = report.recipe
    assert len(recipe["candidates"]) == len(STRONG)
    meeting = [c for c in recipe["candidates"] if c["macs_kept"] <= 0.52]
    lowest = min(meeting, key=lambda c: c["error"])
    assert recipe["chosen"] == {k: lowest[k] for k in ("criterion", "allocation", "recover")}
    assert (report.criterion, report.recovery) == (lowest["criterion"], lowest["recover"])
    errors = sorted(c["error"] for c in recipe["candidates"])
    assert errors[0] < errors[-1]  # the candidates really differ: the search has something to choose


def test_the_recipe_beats_the_fast_defaults_on_test_data(searched):
    pruned, report = searched
    assert report.macs_after / report.macs_before <= 0.52
    onnx.checker.check_model(pruned, full_check=True)
    fast, _ = prune(str(DIGITS), Target.macs(0.5), Options(calib=CalibrationSource(DIGITS_CALIB, size=SAMPLES)))
    data = np.load(DIGITS_DATA)
    images, labels = data["input"][:200], data["label"][:200]
    accuracy = lambda m: float(np.mean(session(m).run(None, {"input": images})[0].argmax(1) == labels))  # noqa
    assert accuracy(pruned) > accuracy(fast)


def test_report_fields_and_summary_line(searched):
    _, report = searched
    data = report.to_dict()["recipe"]
    assert data["name"] == "accurate" and data["held_out_samples"] == SAMPLES // 4
    assert all({"criterion", "allocation", "recover", "error", "macs_kept", "seconds"} <= set(c)
               for c in data["candidates"])
    assert "held-out" in data["why"]
    line = next(line for line in report.summary_lines() if line.startswith("recipe"))
    chosen = data["chosen"]
    assert f"accurate: {chosen['criterion']}/{chosen['allocation']}/{chosen['recover']} of {len(STRONG)} tried" in line


def test_a_tiny_budget_tries_one_candidate_and_says_so(tmp_path):
    result = invoke(DIGITS, "--target-macs", 0.5, "--calib", DIGITS_CALIB, "--calib-size", 8, "--recipe",
                    "accurate", "--recipe-budget", 0.001, "-o", tmp_path / "out.onnx", "--report",
                    tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "report.json").read_text())["recipe"]
    assert [c["criterion"] for c in recipe["candidates"]] == [STRONG[0].criterion]
    assert [recipe_candidate(c) for c in recipe["skipped"]] == list(STRONG[1:])
    assert f"{len(STRONG) - 1} of {len(STRONG)} candidates not tried, estimated to pass the 0.001 s budget" \
        in recipe["why"]
    assert f"recipe      accurate: {STRONG[0]} of 1 tried" in result.stdout
    assert f"recipe accurate: 1/{len(STRONG)} {STRONG[0]}" in result.stderr
    assert f"recipe accurate: 2/{len(STRONG)} {STRONG[1]}: skipped, about" in result.stderr


def test_fixed_choices_hold_in_every_candidate():
    candidates = candidate_list(Options(recover="bias", allocation="sensitivity"), can_refit=True)
    assert {(c.allocation, c.recover) for c in candidates} == {("sensitivity", "bias")}
    assert [c.criterion for c in candidates] == ["l1", "fluctuation", "regression", "activation"]  # no duplicates


def test_without_refittable_layers_no_regression_or_lsq():
    candidates = candidate_list(Options(), can_refit=False)
    assert candidates and all(c.criterion not in ("regression", "fluctuation") and c.recover != "lsq"
                              for c in candidates)
    assert candidate_list(Options(recover="lsq"), can_refit=False)[0].recover == "lsq"  # fixed wins


def test_a_candidate_keeping_more_macs_than_the_target_is_not_chosen():
    tried = [{"error": 0.01, "macs_kept": 0.8}, {"error": 0.2, "macs_kept": 0.5}, {"error": 0.1, "macs_kept": 0.49}]
    assert best_of(tried, Target.macs(0.5)) is tried[2]
    assert best_of(tried, Target.ratio(0.3)) is tried[0]  # a ratio target: every candidate counts
    assert best_of(tried[:1], Target.macs(0.5)) is tried[0]  # none meets it: the best of all


def test_a_failing_candidate_is_recorded_and_left_out(monkeypatch):
    real = recipe.trial

    def lsq_fails(search, target, options):
        if options.recover == "lsq":
            raise OnnxPruneError("least squares gave non-finite weights")
        return real(search, target, options)

    monkeypatch.setattr(recipe, "trial", lsq_fails)
    options = Options(recipe="accurate", calib=CalibrationSource(DIGITS_CALIB, size=8))
    _, report = prune(str(DIGITS), Target.macs(0.5), options)
    failed = [c for c in report.recipe["candidates"] if c["error"] is None]
    assert failed and all(c["recover"] == "lsq" and "non-finite" in c["failed"] for c in failed)
    assert report.recipe["chosen"]["recover"] != "lsq" and f"{len(failed)} failed" in report.recipe["why"]
    monkeypatch.setattr(recipe, "trial", lambda *_: lsq_fails(None, None, Options(recover="lsq")))
    with pytest.raises(OnnxPruneError, match="every candidate tried failed; least squares"):
        prune(str(DIGITS), Target.macs(0.5), options)


def test_holdout_is_the_last_quarter():
    fit, held = holdout_split(CalibrationSource(DIGITS_CALIB, start=4), 40)
    assert (fit.start, fit.size, held.start, held.size) == (4, 30, 34, 10)
    with pytest.raises(UsageError, match="at least 2"):
        holdout_split(CalibrationSource(DIGITS_CALIB), 1)


@pytest.mark.parametrize("args, text", [
    (["--target-macs", 0.5], "--recipe accurate needs calibration data (--calib)"),
    (["--target-latency", 0.5, "--calib", DIGITS_CALIB], "--recipe accurate takes --ratio or --target-macs"),
    (["--ratio", 0.3, "--calib", DIGITS_CALIB, "--schedule", "iterative"], "no --schedule iterative"),
    (["--ratio", 0.3, "--calib", DIGITS_CALIB, "--then", "2:4"], "prunes channels"),
])
def test_usage_errors(tmp_path, args, text):
    result = invoke(DIGITS, *args, "--recipe", "accurate", "-o", tmp_path / "out.onnx")
    one_line_error(result, 2, text)
    assert not (tmp_path / "out.onnx").exists()


def test_a_python_reader_is_refused():
    feeds = [{"input": np.load(DIGITS_CALIB)["input"][:8]}]
    options = Options(recipe="accurate", calib=CalibrationSource(feeds))
    with pytest.raises(UsageError, match="pass a file or a folder"):
        prune(str(DIGITS), Target.ratio(0.3), options)


def costs_measured() -> Costs:
    """Sensitivity curves estimated at 200 s; the defaults ran in 2 s, a bias candidate in 14 s, an lsq one in 60 s."""
    costs = Costs(curve_seconds=200.0)
    costs.record(Candidate("l1", "uniform", "none"), 2.0)
    costs.record(Candidate("fluctuation", "uniform", "bias"), 14.0)
    costs.record(Candidate("regression", "uniform", "lsq"), 60.0)
    return costs


def test_a_candidate_is_estimated_from_those_before_it():
    costs = costs_measured()
    assert costs.estimate(Candidate("activation", "uniform", "bias")) == 14.0
    assert costs.estimate(Candidate("l1", "global", "lsq")) == 60.0
    assert costs.estimate(Candidate("regression", "sensitivity", "lsq")) == 260.0
    assert costs.estimate(Candidate("l1", "uniform", "other")) == 60.0  # nothing like it yet: the slowest
    costs.record(Candidate("regression", "sensitivity", "lsq"), 400.0)  # its curves took 340 s
    assert costs.estimate(Candidate("activation", "sensitivity", "lsq")) == 400.0


def test_the_curves_cost_a_run_per_exact_point_and_a_session_more_per_inexact_one(monkeypatch):
    monkeypatch.setattr(recipe, "curve_points", lambda analysis, round_to: (80, 4))
    assert recipe.curve_seconds(None, 16, run=2.0, start=3.0) == 80 * 2.0 + 4 * 5.0


def test_what_would_pass_the_budget_is_skipped_and_cheaper_candidates_still_run(monkeypatch):
    """75 s of a 100 s budget spent before the search (injected): the first lsq candidate is estimated as the
    slowest bias one (10 s) and runs (30 s); the next lsq ones (30 s) and the sensitivity ones (10 or 30 s + 168 s)
    would pass the budget and are skipped; nothing is timed."""
    seconds = {"none": 1.0, "bias": 10.0, "lsq": 30.0}
    judged = []

    def injected(search, target, options):
        judged.append(options.allocation)
        return {"error": 0.5, "macs_kept": 0.5, "seconds": seconds[options.recover]}

    monkeypatch.setattr(recipe, "judge", injected)
    search = type("Search", (), {"costs": Costs(curve_seconds=168.0)})()
    options = Options(recipe_budget=100.0, quiet=True)
    tried, skipped = recipe.try_candidates(search, Target.macs(0.5), options, list(STRONG), time.perf_counter() - 75)
    assert [recipe_candidate(t) for t in tried] == list(STRONG[:6])
    assert [recipe_candidate(s) for s in skipped] == list(STRONG[6:])
    assert [s["estimated_seconds"] for s in skipped] == [30.0, 30.0, 178.0, 198.0, 198.0]
    assert "sensitivity" not in judged
    why = why_chosen(tried, Target.macs(0.5), skipped, 100.0, 6)
    assert "5 of 11 candidates not tried, estimated to pass the 100 s budget" in why
    assert "regression/sensitivity/lsq ~198 s" in why
