"""What a prune run is asked to do: one tagged target (how much to remove) and the options (how).

Both are plain frozen data, checked once by `validate` before any work, so the pipeline steps never re-check them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from .allocate import ALLOCATIONS, Plan
from .calibrate import CalibrationSource
from .criteria import get_criterion, needs_data
from .errors import UsageError
from .recover import RECOVERY

DEFAULT_ROUND_TO = 16  # ORT's NCHWc convolution blocks (see BENCHMARKS.md, channel alignment)
SCHEDULES = ("oneshot", "iterative")
TargetKind = Literal["ratio", "macs", "latency", "plan"]


@dataclass(frozen=True)
class Target:
    """How much to remove: a channel `ratio` per group, a fraction of the MACs or of the measured latency to keep,
    or a `plan` (a Plan, or a --plan-out file) that names the channels."""

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

    @property
    def budget(self) -> float | None:
        """The fraction of MACs or latency to keep; None for a ratio or a plan."""
        return float(self.value) if self.kind in ("macs", "latency") else None


@dataclass(frozen=True)
class Options:
    """How to prune: criterion, rounding, exclusions, allocation, recovery, schedule and calibration."""

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


def needs_calibration(target: Target, options: Options) -> bool:
    """Whether the run reads calibration data: to score or allocate (not when a plan names the channels), or to
    recover."""
    scoring = target.kind != "plan" and (needs_data(options.criterion) or options.allocation == "sensitivity")
    return scoring or options.recover != "none"


def validate(target: Target, options: Options) -> None:
    """Usage errors before any work: the target's range, and options that are unknown or do not fit together."""
    _validate_target(target, options.allocation)
    _validate_choices(options)
    if options.latency_table is not None and target.kind != "latency":
        raise UsageError("--latency-table needs --target-latency")
    if target.kind == "plan" and options.schedule == "iterative":
        raise UsageError("an iterative schedule chooses its own plan; --plan-in applies one in a single step")
    if needs_calibration(target, options) and options.calib is None:
        raise UsageError(f"{_data_user(target, options)} needs calibration data (--calib)")


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


def _validate_choices(options: Options) -> None:
    if options.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{options.allocation}' (choose from {', '.join(ALLOCATIONS)})")
    if options.round_to < 1:
        raise UsageError(f"round-to must be a positive integer, got {options.round_to}")
    get_criterion(options.criterion)
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
    if target.kind != "plan" and needs_data(options.criterion):
        return f"criterion {options.criterion}"
    if target.kind != "plan" and options.allocation == "sensitivity":
        return "allocation sensitivity"
    return "recovery"
