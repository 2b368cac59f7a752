"""What a prune run is asked to do: one tagged target (how much to remove) and the options (how).

Both are plain frozen data, checked once by `validate` before any work, so the pipeline steps never re-check them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from .allocate import ALLOCATIONS, Plan
from .calibrate import CalibrationSource
from .criteria import CRITERIA, STATISTICS, get_criterion, needs_data
from .errors import UsageError
from .group_types import GROUP_TYPES
from .recover import RECOVERY
from .sparsity.spec import SPARSE_ALLOCATIONS, SPARSE_CRITERIA, Request, parse_pattern

DEFAULT_ROUND_TO = 16  # ORT's NCHWc convolution blocks (see BENCHMARKS.md, channel alignment)
SCHEDULES = ("oneshot", "iterative")
RECIPES = ("fast", "accurate")  # fast: the options as given; accurate: searched on held-out calibration data (recipe.py)
DEFAULT_RECIPE_BUDGET = 180.0  # seconds the accurate recipe's search may take before the final prune
TargetKind = Literal["ratio", "macs", "latency", "plan", "params"]


@dataclass(frozen=True)
class Target:
    """How much to remove: a channel `ratio` per group, a fraction of the MACs or of the measured latency to keep,
    or a `plan` (a Plan, or a --plan-out file) that names the channels. With a sparsity granularity, `ratio` is the
    share of weights zeroed and `params` the fraction of the model's non-zero parameters to keep."""

    kind: TargetKind
    value: float | Plan | str | os.PathLike

    @classmethod
    def ratio(cls, value: float) -> "Target":
        return cls("ratio", value)

    @classmethod
    def macs(cls, fraction: float) -> "Target":
        return cls("macs", fraction)

    @classmethod
    def latency(cls, fraction: float) -> "Target":
        return cls("latency", fraction)

    @classmethod
    def plan(cls, plan: Plan | str | os.PathLike) -> "Target":
        return cls("plan", plan)

    @classmethod
    def params(cls, fraction: float) -> "Target":
        return cls("params", fraction)

    @property
    def budget(self) -> float | None:
        """The fraction of MACs or latency to keep; None for a ratio or a plan."""
        return float(self.value) if self.kind in ("macs", "latency") else None


@dataclass(frozen=True)
class Options:
    """How to prune: criterion, rounding, exclusions, allocation, recovery, schedule and calibration; the
    granularity (`channel`, `unstructured` or `N:M` such as `2:4`), and an N:M step `then` after channel pruning,
    chosen by `then_criterion`. `stats`: a statistics file (`onnxprune calibrate`) that serves the criterion's
    scores and bias recovery instead of a calibration pass."""

    criterion: str = "l1"
    round_to: int = DEFAULT_ROUND_TO
    exclude: tuple[str, ...] = ()
    seed: int = 0
    allocation: str = "uniform"
    recover: str = "none"
    schedule: str = "oneshot"
    steps: int = 3
    calib: CalibrationSource | None = None
    threads: int = 1  # onnxruntime threads for a latency target
    latency_table: str | os.PathLike | None = None
    quiet: bool = True
    granularity: str = "channel"
    then: str | None = None
    then_criterion: str = "l1"
    stats: str | os.PathLike | None = None
    recipe: str = "fast"
    recipe_budget: float = DEFAULT_RECIPE_BUDGET
    protect: tuple[str, ...] = ()  # group types (group_types.GROUP_TYPES) left whole: a detector's "head"
    slice: float = 0.0  # share of a transformer's hidden width removed before the channel steps (slicing/)


def statistics_needed(target: Target, options: Options) -> frozenset[str]:
    """The statistics the criterion declares (when it chooses the channels) and bias recovery's channel means."""
    reads = STATISTICS.get(options.criterion, frozenset()) if target.kind != "plan" else frozenset()
    return reads | ({"channels"} if options.recover == "bias" else set())


def needs_calibration(target: Target, options: Options) -> bool:
    """Whether the run reads calibration data: to score or allocate (not when a plan names the channels), or to
    recover."""
    sparse = sparsity_request(target, options)
    if parse_pattern(options.granularity) is not None:
        return sparse.needs_data
    scoring = target.kind != "plan" and (needs_data(options.criterion) or options.allocation == "sensitivity")
    return scoring or options.recover != "none" or (sparse is not None and sparse.needs_data)


def sparsity_request(target: Target, options: Options) -> Request | None:
    """The sparsity step the run asks for (--granularity unstructured or N:M, or --then N:M after the channels);
    None for channel pruning alone."""
    pattern = parse_pattern(options.granularity)
    refit = options.recover == "lsq"
    if pattern is not None:
        ratio = target.value if target.kind == "ratio" and pattern.unstructured else pattern.share
        return Request(pattern, options.criterion, ratio, target.value if target.kind == "params" else None,
                       options.allocation, refit, options.exclude)
    if options.then is None:
        return None
    then = parse_pattern(options.then)
    return Request(then, options.then_criterion, then.share, refit=refit, exclude=options.exclude)


def validate(target: Target, options: Options) -> None:
    """Usage errors before any work: the target's range, and options that are unknown or do not fit together."""
    _validate_target(target, options.allocation)
    _validate_choices(options)
    if parse_pattern(options.granularity) is None:
        _validate_channel_choices(options)
        _validate_then(target, options)
    else:
        _validate_sparsity(target, options)
    if options.recipe != "fast":
        _validate_recipe(target, options)
    if options.slice:
        _validate_slice(target, options)
    if set(options.protect) - set(GROUP_TYPES):
        raise UsageError(f"--protect takes group types ({', '.join(GROUP_TYPES)}), got "
                         f"{', '.join(sorted(set(options.protect) - set(GROUP_TYPES)))}")
    if options.latency_table is not None and target.kind != "latency":
        raise UsageError("--latency-table needs --target-latency")
    if target.kind == "plan" and options.schedule == "iterative":
        raise UsageError("an iterative schedule chooses its own plan; --plan-in applies one in a single step")
    if options.stats is not None:
        _validate_stats(target, options)
    elif needs_calibration(target, options) and options.calib is None:
        raise UsageError(f"{_data_user(target, options)} needs calibration data (--calib)")


def _validate_stats(target: Target, options: Options) -> None:
    """--stats serves what is computed from statistics (the criterion's scores, bias recovery); the steps that run
    the model on data still need --calib."""
    if parse_pattern(options.granularity) is not None or not statistics_needed(target, options):
        served = ", ".join(sorted(name for name in CRITERIA if needs_data(name)))
        raise UsageError(f"--stats serves the criteria that read statistics ({served}) and --recover bias; "
                         "this run reads none")
    if options.schedule == "iterative":
        raise UsageError("--stats holds the original model's statistics; an iterative schedule re-scores the "
                         "pruned model after each step: give --calib instead")
    runner = _data_runner(target, options)
    if runner is not None and options.calib is None:
        raise UsageError(f"{runner} runs the model on calibration data, which --stats cannot serve: give --calib too")


def _data_runner(target: Target, options: Options) -> str | None:
    """What in the run must run the model on calibration data (statistics cannot serve it), or None."""
    sparse = sparsity_request(target, options)
    if options.recover == "lsq":
        return "--recover lsq"
    if target.kind != "plan" and options.allocation == "sensitivity":
        return "allocation sensitivity"
    return f"--then-criterion {sparse.criterion}" if sparse is not None and sparse.needs_data else None


def _validate_recipe(target: Target, options: Options) -> None:
    """--recipe accurate prunes channels one-shot to a ratio or MAC target, trying candidates on calibration data."""
    if options.recipe not in RECIPES:
        raise UsageError(f"unknown recipe '{options.recipe}' (choose from {', '.join(RECIPES)})")
    if options.calib is None:
        raise UsageError("--recipe accurate needs calibration data (--calib): it judges candidates on held-out samples")
    if target.kind not in ("ratio", "macs"):
        raise UsageError("--recipe accurate takes --ratio or --target-macs")
    if parse_pattern(options.granularity) is not None or options.then is not None:
        raise UsageError("--recipe accurate prunes channels: no --granularity unstructured or N:M, no --then")
    if options.schedule != "oneshot" or options.stats is not None:
        raise UsageError("--recipe accurate runs one-shot on --calib: no --schedule iterative, no --stats")
    if options.recipe_budget <= 0:
        raise UsageError(f"recipe-budget must be positive, got {options.recipe_budget}")


def _validate_slice(target: Target, options: Options) -> None:
    """--slice F: a share in [0, 1), principal directions from --calib, one step before channels to a ratio or MACs."""
    if not 0 <= options.slice < 1:
        raise UsageError(f"slice must be in [0, 1), got {options.slice}")
    if options.calib is None:
        raise UsageError("--slice needs calibration data (--calib): the directions kept are measured on it")
    if target.kind in ("latency", "plan") or options.schedule != "oneshot":
        raise UsageError("--slice takes --ratio, --target-macs or --target-params and a one-shot schedule")


def _validate_target(target: Target, allocation: str) -> None:
    if target.kind == "latency":
        if not 0 < target.value <= 1:
            raise UsageError(f"target-latency must be in (0, 1], got {target.value}")
        if allocation == "sensitivity":
            raise UsageError("target-latency needs uniform or global allocation, not sensitivity")
    if target.kind == "macs" and not 0 < target.value <= 1:
        raise UsageError(f"target-macs must be in (0, 1], got {target.value}")
    if target.kind == "ratio" and (target.value is None or not 0 <= target.value < 1):
        raise UsageError(f"ratio must be in [0, 1), got {target.value}")
    if target.kind == "params" and not 0 < target.value <= 1:
        raise UsageError(f"target-params must be in (0, 1], got {target.value}")


def _validate_sparsity(target: Target, options: Options) -> None:
    """--granularity unstructured or N:M: a share of zeros (unstructured: --ratio or --target-params; N:M: its own),
    a sparsity criterion, uniform or (unstructured) sensitivity allocation, no recovery but lsq, one step."""
    pattern = parse_pattern(options.granularity)
    if target.kind not in ("ratio", "params") or (target.kind == "params" and not pattern.unstructured):
        raise UsageError(f"--granularity {pattern} takes " + ("--ratio (the share of weights zeroed) or "
                         "--target-params" if pattern.unstructured else "no target: N:M sets the share of zeros; "
                         "--ratio R --then N:M prunes channels first"))
    if not pattern.unstructured and target.value != pattern.share:
        raise UsageError(f"--granularity {pattern} zeroes {pattern.share:g} of the weights; --ratio R --then "
                         f"{pattern} prunes channels first")
    if options.criterion not in SPARSE_CRITERIA:
        raise UsageError(f"criterion '{options.criterion}' ranks channels; --granularity {pattern} takes "
                         f"{', '.join(SPARSE_CRITERIA)}")
    allocations = SPARSE_ALLOCATIONS if pattern.unstructured else ("uniform",)
    if options.allocation not in allocations:
        raise UsageError(f"--granularity {pattern} takes allocation {' or '.join(allocations)}")
    if options.recover == "bias" or options.schedule != "oneshot" or options.then is not None:
        raise UsageError(f"--granularity {pattern} takes --recover none or lsq, a one-shot schedule and no --then")


def _validate_then(target: Target, options: Options) -> None:
    """--then N:M after channel pruning: an N:M pattern, a sparsity criterion, one step; --target-params is for
    --granularity unstructured."""
    if target.kind == "params":
        raise UsageError("--target-params needs --granularity unstructured")
    if options.then is None:
        return
    then = parse_pattern(options.then)
    if then is None or then.unstructured:
        raise UsageError(f"--then takes an N:M pattern (2:4, 4:8, ...), got '{options.then}'")
    if options.then_criterion not in SPARSE_CRITERIA:
        raise UsageError(f"unknown then-criterion '{options.then_criterion}' (choose from "
                         f"{', '.join(SPARSE_CRITERIA)})")
    if options.schedule != "oneshot":
        raise UsageError("--then needs a one-shot schedule")


def _validate_channel_choices(options: Options) -> None:
    if options.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{options.allocation}' (choose from {', '.join(ALLOCATIONS)})")
    if options.criterion in SPARSE_CRITERIA and options.criterion not in CRITERIA:
        raise UsageError(f"criterion '{options.criterion}' chooses single weights: use it with --granularity "
                         "unstructured or N:M, or as --then-criterion")
    get_criterion(options.criterion)


def _validate_choices(options: Options) -> None:
    if options.round_to < 1:
        raise UsageError(f"round-to must be a positive integer, got {options.round_to}")
    if options.recover not in RECOVERY:
        raise UsageError(f"unknown recovery '{options.recover}' (choose from {', '.join(RECOVERY)})")
    if options.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{options.schedule}' (choose from {', '.join(SCHEDULES)})")
    if options.steps < 1:
        raise UsageError(f"steps must be at least 1, got {options.steps}")
    if options.seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {options.seed}")


def _data_user(target: Target, options: Options) -> str:
    """What in the run needs calibration data, as the error names it."""
    sparse = sparsity_request(target, options)
    if sparse is not None and sparse.needs_data and sparse.criterion != "l1":
        return f"criterion {sparse.criterion}"
    if target.kind != "plan" and needs_data(options.criterion):
        return f"criterion {options.criterion}"
    if target.kind != "plan" and options.allocation == "sensitivity":
        return "allocation sensitivity"
    return "recovery"
