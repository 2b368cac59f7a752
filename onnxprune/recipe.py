"""`--recipe accurate`: the tool chooses criterion, allocation, recovery and, for a transformer, the hidden-width
slicing from measurements on calibration data.

One sample in HOLDOUT of the calibration data is held out to judge. The statistics every candidate reads are
collected once on the rest; each candidate (criterion, allocation, recovery) is then scored, allocated to the
target, applied and recovered on that part, and judged by the relative squared error of the model's outputs against
the original's on the held-out samples (the damage the sensitivity curves measure). Candidates run in the order of
STRONG, cheapest first; one whose estimated cost (Costs: measured on the candidates before it) would take the search
past its time budget is skipped, and the report says so. The one with the lowest error is then redone with all
samples, as a plain prune with those options. A slicing candidate (`slice` above 0) is tried only where the model
has a residual stream slicing recognises; it runs the pipeline's `--slice` path (run_once) on the fit samples, the
sliced model's statistics its own.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import onnx

from .allocate import TARGET_TOLERANCE
from .calibrate import Calibration, CalibrationSource, Statistics, without_padding
from .criteria import consumers
from .errors import OnnxPruneError, UsageError, first_line
from .groups import Analysis
from .layers import refittable
from .options import Options, Target, statistics_needed
from .pipeline import (SENSITIVITY_SAMPLES, Inputs, allocate, collect_statistics, mac_model_of, open_inputs, recover,
                       run_once, score)
from .report import PruneReport
from .sensitivity import curve_points, flattened_outputs, model_outputs, output_damage
from .slicing import has_stream
from .surgery import apply_plan
from .verify import count_macs, sample_shapes, session

HOLDOUT = 4  # one calibration sample in HOLDOUT judges the candidates, the others fit them


@dataclass(frozen=True)
class Candidate:
    """One combination the accurate recipe tries: a value for each searched option, named as in Options (`slice`:
    the share of a transformer's hidden width removed first, 0 for none); the search, the report and the final
    prune take them from the fields."""

    criterion: str
    allocation: str
    recover: str
    slice: float = 0.0

    def options(self, base: Options) -> Options:
        return replace(base, **self.to_dict(), recipe="fast")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.criterion}/{self.allocation}/{self.recover}"
        return f"{text}/slice {self.slice:g}" if self.slice else text


SEARCHED = tuple(f.name for f in fields(Candidate))

# Cheapest first (BENCHMARKS.md, issues 4, 5 and 14), so a budget cuts the slow ones. Today's defaults (seconds, no
# statistics: the search is never worse on the held-out samples than --recipe fast); then bias compensation, one
# statistics pass and two runs of the model: FLAP's fluctuation (with its standardised allocation the best on
# MiniLM) and the reconstruction criterion; then least-squares re-fits (regression + lsq won on CNNs), and last
# sensitivity allocation, which prunes each group alone at several ratios (seconds on the digits CNN, minutes on a
# transformer, where fluctuation + bias with it was best of all: estimated first, skipped where it would not fit).
# Before those, on a transformer only: 30% of the hidden width sliced (one more pass over the data and its own
# statistics), then the best bias candidate and regression + lsq (which beat no slicing on MiniLM with 256
# calibration sentences, and lost with 64: BENCHMARKS.md, issue 14).
STRONG = (Candidate("l1", "uniform", "none"), Candidate("fluctuation", "uniform", "bias"),
          Candidate("regression", "uniform", "bias"), Candidate("fluctuation", "standardised", "bias"),
          Candidate("activation", "uniform", "bias"), Candidate("regression", "uniform", "lsq"),
          Candidate("l1", "uniform", "lsq"), Candidate("regression", "global", "lsq"),
          Candidate("fluctuation", "standardised", "bias", 0.3), Candidate("regression", "uniform", "lsq", 0.3),
          Candidate("fluctuation", "sensitivity", "bias"), Candidate("regression", "sensitivity", "lsq"),
          Candidate("activation", "sensitivity", "lsq"))


def fixed_choices(options: Options) -> dict[str, str | float]:
    """The dimensions the user fixed: a criterion, allocation, recovery or slice other than its default is kept in
    every candidate; the others are searched."""
    default = Options()
    return {name: getattr(options, name) for name in SEARCHED if getattr(options, name) != getattr(default, name)}


def candidate_list(options: Options, can_refit: bool, can_slice: bool = False) -> list[Candidate]:
    """STRONG with the fixed dimensions put in, duplicates dropped. Where no layer can be re-fitted, regression and
    fluctuation become activation and lsq becomes bias, unless fixed; where the model has no residual stream to
    slice, the slicing candidates are dropped."""
    fixed, found = fixed_choices(options), []
    for candidate in STRONG:
        if candidate.slice and not can_slice:
            continue
        if not can_refit:
            candidate = _without_refit(candidate)
        candidate = replace(candidate, **fixed)
        if candidate not in found:
            found.append(candidate)
    return found


def _without_refit(candidate: Candidate) -> Candidate:
    """Regression's Gram matrices and fluctuation's weight columns live on re-fittable layers: activation instead."""
    criterion = "activation" if candidate.criterion in ("regression", "fluctuation") else candidate.criterion
    return replace(candidate, criterion=criterion, recover="bias" if candidate.recover == "lsq" else candidate.recover)


def can_refit(analysis: Analysis) -> bool:
    """Whether some prunable group is read by a layer least squares can re-fit (regression and lsq work there)."""
    index = analysis.index
    return any(refittable(node, index, quantized=True) is not None
               for group in analysis.prunable for node, _ in consumers(group, index))


def holdout_split(source: CalibrationSource, total: int) -> tuple[CalibrationSource, CalibrationSource]:
    """The samples that fit the candidates (the first ones) and those that judge them (the last 1/HOLDOUT)."""
    if total < 2:
        raise UsageError(f"--recipe accurate holds out calibration samples to judge candidates: it needs at least 2, "
                         f"got {total}")
    judged = max(1, total // HOLDOUT)
    return (replace(source, size=total - judged),
            replace(source, start=source.start + total - judged, size=judged))


def stored_samples(calibration: Calibration) -> int:
    """The samples of a file or folder; data from a Python reader is refused, as it cannot be split."""
    if not isinstance(calibration.source.data, (str, os.PathLike)):
        raise UsageError("--recipe accurate holds out part of the calibration data: pass a file or a folder, not a "
                         "Python reader")
    return calibration.stored_samples()


@dataclass
class Costs:
    """Seconds the search has measured, to estimate a candidate's before it starts: the slowest candidate so far of
    each kind (its recovery, sliced or not; allocation not by sensitivity), and what the sensitivity curves add
    (curve_seconds)."""

    curve_seconds: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)

    def estimate(self, candidate: Candidate) -> float:
        """The candidate's seconds: as the slowest one of its kind (the slowest of any where none ran yet), plus
        the sensitivity curves where it allocates by sensitivity."""
        base = self.by_kind.get(_kind(candidate), max(self.by_kind.values(), default=0.0))
        return base + (self.curve_seconds if candidate.allocation == "sensitivity" else 0.0)

    def record(self, candidate: Candidate, seconds: float) -> None:
        """Learn from a candidate that ran for `seconds`; a sensitivity candidate says what its curves cost."""
        base = self.by_kind.get(_kind(candidate), 0.0)
        if candidate.allocation == "sensitivity":
            self.curve_seconds = max(self.curve_seconds, seconds - base)
        else:
            self.by_kind[_kind(candidate)] = max(seconds, base)


def _kind(candidate: Candidate) -> str:
    """What a candidate's cost is estimated by: its recovery, and whether it slices first (a pass over the data
    and the sliced model's own statistics)."""
    return f"{candidate.recover} sliced" if candidate.slice else candidate.recover


def curve_seconds(analysis: Analysis, round_to: int, run: float, start: float) -> float:
    """The sensitivity curves' seconds: a run on the sensitivity samples per point of an exact group, and a session
    started for each point of an inexact one (see sensitivity.ZeroedRuns)."""
    exact, inexact = curve_points(analysis, round_to)
    return exact * run + inexact * (run + start)


def timed_outputs(model: onnx.ModelProto, feeds: list[dict]) -> tuple[list, float, float]:
    """The model's outputs on `feeds` (see model_outputs), and the seconds its session took to start and to run."""
    begun = time.perf_counter()
    sess = session(model, threads=0)
    started = time.perf_counter()
    outputs = flattened_outputs([sess.run(None, feed) for feed in feeds])
    return outputs, started - begun, time.perf_counter() - started


@dataclass
class Search:
    """What every candidate reads: the inputs on the fit samples, their statistics, the held-out feeds and the
    original's outputs on them, and what the candidates cost so far."""

    inputs: Inputs
    held: list[dict]
    held_samples: int
    reference: list
    costs: Costs
    stats: Statistics | None = None


def open_search(model_or_path, target: Target, options: Options) -> Search:
    """Prepare the model once, split the calibration data, and run the original on the held-out samples, padding
    cut away (timed: the sensitivity curves' cost is estimated from it)."""
    opened = open_inputs(model_or_path, target, replace(options, recover="lsq"))  # replayable data
    fit, held = holdout_split(options.calib, stored_samples(opened.calibration))
    inputs = Inputs(opened.prepared, Calibration(fit, opened.model, replayable=True), opened.sample, opened.shapes)
    feeds = without_padding(opened.model, list(Calibration(held, opened.model, replayable=True).batches()))
    reference, start, run = timed_outputs(opened.model, feeds)
    run *= min(SENSITIVITY_SAMPLES, fit.size) / held.size  # the sensitivity samples: the first of the fit ones
    costs = Costs(curve_seconds(inputs.analysis, options.round_to, run, start))
    return Search(inputs, feeds, held.size, reference, costs)


def collect_once(search: Search, target: Target, options: Options, candidates: list[Candidate]) -> None:
    """The statistics any candidate reads, in one pass over the fit samples (a slicing candidate reads its sliced
    model's own)."""
    reads = frozenset().union(*(statistics_needed(target, c.options(options)) for c in candidates if not c.slice))
    search.stats = collect_statistics(search.inputs, reads, options.quiet) if reads else None


def trial(search: Search, target: Target, options: Options) -> onnx.ModelProto:
    """The candidate's pruned and recovered model, chosen and fitted on the fit samples."""
    if options.slice:
        return sliced_trial(search, target, options)
    inputs = search.inputs
    scores = score(inputs, options, search.stats)
    plan, _ = allocate(inputs, target, options, scores.values, mac_model=mac_model_of(inputs))
    pruned = apply_plan(copy.deepcopy(inputs.model), inputs.analysis, plan)
    recover(pruned, inputs.model, inputs, plan, options, search.stats)
    return pruned


def sliced_trial(search: Search, target: Target, options: Options) -> onnx.ModelProto:
    """A slicing candidate's model: the pipeline's --slice path (slice, then score, allocate, apply and recover on
    the sliced model against the original projected into its basis) on the fit samples."""
    pruned, _ = run_once(search.inputs.model, target, replace(options, calib=search.inputs.calibration.source))
    return pruned


def try_candidates(search: Search, target: Target, options: Options, candidates: list[Candidate],
                   started: float) -> tuple[list[dict], list[dict]]:
    """Each candidate's held-out error, MACs kept and seconds, in order, and the candidates skipped because their
    estimated cost (Costs) would take the search past its budget; the first always runs."""
    tried, skipped = [], []
    for position, candidate in enumerate(candidates):
        estimate = search.costs.estimate(candidate)
        if tried and time.perf_counter() - started + estimate > options.recipe_budget:
            skipped.append(candidate.to_dict() | {"estimated_seconds": round(estimate, 1)})
            _progress(options, f"recipe accurate: {position + 1}/{len(candidates)} {candidate}: skipped, about "
                               f"{estimate:.0f} s would pass the {options.recipe_budget:g} s budget")
            continue
        found = judge(search, target, candidate.options(options))
        search.costs.record(candidate, found["seconds"])
        tried.append(found | candidate.to_dict())
        _progress(options, f"recipe accurate: {position + 1}/{len(candidates)} {candidate}: " + _outcome(tried[-1]))
    if all(t["error"] is None for t in tried):
        raise OnnxPruneError(f"--recipe accurate: every candidate tried failed; {tried[0]['failed']}")
    return tried, skipped


def judge(search: Search, target: Target, options: Options) -> dict:
    """One candidate's held-out error, MACs kept and seconds; a candidate the data or the model defeats (an
    OnnxPruneError: a non-finite fit, too little memory) is recorded with its reason and left out of the choice."""
    begun = time.perf_counter()
    try:
        pruned = trial(search, target, options)
        found = {"error": output_damage(search.reference, model_outputs(pruned, search.held)),
                 "macs_kept": macs_kept(search, pruned)}
    except OnnxPruneError as exc:
        found = {"error": None, "macs_kept": None, "failed": first_line(exc)}
    return found | {"seconds": round(time.perf_counter() - begun, 3)}


def _outcome(tried: dict) -> str:
    if tried["error"] is None:
        return f"failed: {tried['failed']} ({tried['seconds']:.1f} s)"
    return (f"held-out error {tried['error']:.4g} at {tried['macs_kept']:.1%} of the MACs "
            f"({tried['seconds']:.1f} s)")


def macs_kept(search: Search, pruned: onnx.ModelProto) -> float:
    """The fraction of the original's MACs the candidate keeps (1.0 where none are counted)."""
    inputs = search.inputs
    before = count_macs(inputs.model, inputs.shapes)
    return count_macs(pruned, sample_shapes(pruned, inputs.sample)) / before if before else 1.0


def _progress(options: Options, line: str) -> None:
    if not options.quiet:
        print(line, file=sys.stderr, flush=True)


def eligible(tried: list[dict], target: Target) -> list[dict]:
    """The candidates that ran and meet a MAC target (a plan that keeps more MACs would win by pruning less); all
    that ran where none meets it, or for a ratio target."""
    ran = [t for t in tried if t["error"] is not None]
    if target.kind != "macs":
        return ran
    return [t for t in ran if t["macs_kept"] <= target.value + TARGET_TOLERANCE] or ran


def best_of(tried: list[dict], target: Target) -> dict:
    """The eligible candidate with the lowest held-out error; the earlier in the order on a tie."""
    return min(eligible(tried, target), key=lambda t: t["error"])


def why_chosen(tried: list[dict], target: Target, skipped: list[dict], budget: float, held: int) -> str:
    """The report's one sentence on the choice."""
    best = best_of(tried, target)
    others = sorted((t for t in eligible(tried, target) if t is not best), key=lambda t: t["error"])
    text = f"lowest relative output error on {held} held-out calibration samples ({best['error']:.4g})"
    if others:
        text += f"; next best {Candidate(*[others[0][k] for k in SEARCHED])} ({others[0]['error']:.4g})"
    failed = sum(t["error"] is None for t in tried)
    if len(eligible(tried, target)) < len(tried) - failed:
        text += f"; {len(tried) - failed - len(eligible(tried, target))} left out for keeping more MACs than the target"
    if failed:
        text += f"; {failed} failed"
    if skipped:
        estimates = ", ".join(f"{Candidate(*[s[k] for k in SEARCHED])} ~{s['estimated_seconds']:.0f} s"
                              for s in skipped)
        text += (f"; {len(skipped)} of {len(tried) + len(skipped)} candidates not tried, estimated to pass the "
                 f"{budget:g} s budget ({estimates})")
    return text


def run_recipe(model_or_path, target: Target, options: Options) -> tuple[onnx.ModelProto, PruneReport]:
    """The accurate recipe: search the candidates on held-out calibration samples, then prune with the best one's
    options on all samples. The report says what was tried, what was chosen and why (`report.recipe`)."""
    started = time.perf_counter()
    search = open_search(model_or_path, target, options)
    candidates = candidate_list(options, can_refit(search.inputs.analysis), has_stream(search.inputs.model))
    collect_once(search, target, options, candidates)
    tried, skipped = try_candidates(search, target, options, candidates, started)
    chosen = Candidate(*[best_of(tried, target)[k] for k in SEARCHED])
    _progress(options, f"recipe accurate: chose {chosen}; pruning with all calibration samples")
    pruned, report = run_once(model_or_path, target, chosen.options(options))
    report.recipe = {"name": "accurate", "budget_seconds": options.recipe_budget, "candidates": tried,
                     "skipped": skipped, "chosen": chosen.to_dict(), "held_out_samples": search.held_samples,
                     "why": why_chosen(tried, target, skipped, options.recipe_budget, search.held_samples)}
    report.seconds = time.perf_counter() - started
    return pruned, report
