"""--recipe accurate: the candidates tried on held-out calibration samples, the choice, the budget, the report,
and the usage errors. The digits CNN with few samples keeps it short; a small post-LN encoder built in code tries the
slicing candidates too."""
import json
import time

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, DIGITS_DATA, invoke, one_line_error
from test_slicing import LENGTH, WIDTH, post_ln_encoder

from onnxprune.api import CalibrationSource, Options, Target, prune
from onnxprune import recipe
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.recipe import SEARCHED, STRONG, Candidate, Costs, best_of, candidate_list, holdout_split, why_chosen
from onnxprune.verify import session

SAMPLES = 24  # 18 fit the candidates, 6 judge them
UNSLICED = [c for c in STRONG if not c.slice]  # what a model without a residual stream (the digits CNN) tries


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
    assert [recipe_candidate(c) for c in recipe["candidates"]] == UNSLICED  # no stream: no slicing candidate
    meeting = [c for c in recipe["candidates"] if c["macs_kept"] <= 0.52]
    lowest = min(meeting, key=lambda c: c["error"])
    assert recipe["chosen"] == {k: lowest[k] for k in SEARCHED} and recipe["chosen"]["slice"] == 0.0
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
    chosen = recipe_candidate(data["chosen"])
    assert f"accurate: {chosen} of {len(UNSLICED)} tried" in line


def test_a_tiny_budget_tries_one_candidate_and_says_so(tmp_path):
    result = invoke(DIGITS, "--target-macs", 0.5, "--calib", DIGITS_CALIB, "--calib-size", 8, "--recipe",
                    "accurate", "--recipe-budget", 0.001, "-o", tmp_path / "out.onnx", "--report",
                    tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "report.json").read_text())["recipe"]
    assert [c["criterion"] for c in recipe["candidates"]] == [STRONG[0].criterion]
    assert [recipe_candidate(c) for c in recipe["skipped"]] == UNSLICED[1:]
    assert f"{len(UNSLICED) - 1} of {len(UNSLICED)} candidates not tried, estimated to pass the 0.001 s budget" \
        in recipe["why"]
    assert f"recipe      accurate: {STRONG[0]} of 1 tried" in result.stdout
    assert f"recipe accurate: 1/{len(UNSLICED)} {STRONG[0]}" in result.stderr
    assert f"recipe accurate: 2/{len(UNSLICED)} {STRONG[1]}: skipped, about" in result.stderr


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
    slowest bias one (10 s) and runs (30 s); the next lsq ones (30 s), the slicing ones (none ran yet: the slowest,
    30 s) and the sensitivity ones (10 or 30 s + 168 s) would pass the budget and are skipped; nothing is timed."""
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
    assert [s["estimated_seconds"] for s in skipped] == [30.0, 30.0, 30.0, 30.0, 178.0, 198.0, 198.0]
    assert "sensitivity" not in judged
    why = why_chosen(tried, Target.macs(0.5), skipped, 100.0, 6)
    assert "7 of 13 candidates not tried, estimated to pass the 100 s budget" in why
    assert "regression/sensitivity/lsq ~198 s" in why


def test_slicing_candidates_only_where_the_model_has_a_stream():
    sliced = [c for c in STRONG if c.slice]
    assert sliced and all(STRONG.index(c) > STRONG.index(Candidate("regression", "uniform", "lsq")) for c in sliced)
    assert [c for c in candidate_list(Options(), can_refit=True, can_slice=True) if c.slice] == sliced
    assert candidate_list(Options(), can_refit=True) == UNSLICED
    fixed = candidate_list(Options(slice=0.2), can_refit=True, can_slice=True)  # a fixed --slice: every candidate
    assert {c.slice for c in fixed} == {0.2} and len(fixed) == len(UNSLICED)  # the slicing ones become duplicates
    assert str(Candidate("regression", "uniform", "lsq", 0.3)) == "regression/uniform/lsq/slice 0.3"


def test_slicing_candidates_cost_as_the_slowest_until_one_ran():
    costs = Costs()
    costs.record(Candidate("regression", "uniform", "lsq"), 60.0)
    costs.record(Candidate("fluctuation", "uniform", "bias"), 14.0)
    assert costs.estimate(Candidate("fluctuation", "standardised", "bias", 0.3)) == 60.0
    costs.record(Candidate("fluctuation", "standardised", "bias", 0.3), 90.0)
    assert costs.estimate(Candidate("regression", "uniform", "lsq", 0.3)) == 90.0
    assert costs.estimate(Candidate("activation", "uniform", "bias")) == 14.0  # an unsliced one: as before


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A small post-LN encoder (test_slicing) and a file of 24 sequences of token ids."""
    folder = tmp_path_factory.mktemp("encoder")
    onnx.save(post_ln_encoder(layers=2, seed=5), folder / "encoder.onnx")
    np.savez(folder / "calib.npz", ids=np.random.default_rng(0).integers(0, 50, (SAMPLES, LENGTH)))
    return folder / "encoder.onnx", folder / "calib.npz"


def encoder_options(calib) -> Options:
    return Options(recipe="accurate", round_to=1, calib=CalibrationSource(str(calib), size=SAMPLES), quiet=True)


def test_on_a_transformer_the_slicing_candidates_are_judged_like_the_others(encoder):
    model, calib = encoder
    pruned, report = prune(str(model), Target.macs(0.6), encoder_options(calib))
    tried = [recipe_candidate(c) for c in report.recipe["candidates"]]
    sliced = [c for c in report.recipe["candidates"] if c["slice"]]
    assert tried == list(STRONG) and [recipe_candidate(c) for c in sliced] == [c for c in STRONG if c.slice]
    assert all(c["error"] is not None and 0 < c["macs_kept"] <= 0.62 for c in sliced), sliced
    assert len({round(c["error"], 9) for c in report.recipe["candidates"]}) > len(STRONG) // 2  # really judged
    chosen = report.recipe["chosen"]
    assert (report.criterion, report.recovery) == (chosen["criterion"], chosen["recover"])
    assert (report.slicing is not None) == bool(chosen["slice"])
    onnx.checker.check_model(pruned, full_check=True)


def test_the_final_prune_slices_when_a_slicing_candidate_wins(encoder, monkeypatch):
    """The judge is injected so that regression/uniform/lsq/slice 0.3 wins: the final prune (all samples) slices
    30% of the width with those options, and the summary says so."""
    real = recipe.judge
    winner = Candidate("regression", "uniform", "lsq", 0.3)

    def slicing_wins(search, target, options):
        found = real(search, target, options)
        return found | {"error": 0.0 if Candidate(*[getattr(options, k) for k in SEARCHED]) == winner else 1.0}

    monkeypatch.setattr(recipe, "judge", slicing_wins)
    model, calib = encoder
    pruned, report = prune(str(model), Target.macs(0.6), encoder_options(calib))
    assert report.recipe["chosen"] == winner.to_dict()
    assert report.slicing.startswith(f"hidden width {WIDTH} -> 11") and report.recovery == "lsq"
    assert report.criterion == "regression" and report.calibration_samples == SAMPLES
    assert report.macs_after <= 0.62 * report.macs_before
    assert any("accurate: regression/uniform/lsq/slice 0.3 of" in line for line in report.summary_lines())
    onnx.checker.check_model(pruned, full_check=True)
