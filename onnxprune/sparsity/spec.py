"""What a sparsity run is asked for: the pattern of zeros (`unstructured`, or N:M along the input channels), the
criterion that chooses them, how the share of zeros is set, and the recovery.

Plain data, parsed from the options' text once (`options.validate` refuses what does not fit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

SPARSE_CRITERIA = ("l1", "wanda", "sparsegpt")
DATA_CRITERIA = ("wanda", "sparsegpt")  # read the layers' inputs on calibration data
SPARSE_ALLOCATIONS = ("uniform", "sensitivity")
SPEED_NOTE = ("onnxruntime CPU runs sparse weights at dense speed; expect file-size gains (packed storage) and 2:4 "
              "speed-ups only on TensorRT with sparse tensor cores")


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: anywhere (`m` = 0, unstructured), or at most `n` non-zeros in every `m` consecutive input
    channels, for every output channel and kernel position (N:M, the layout TensorRT's sparse kernels read)."""

    n: int = 0
    m: int = 0

    @property
    def unstructured(self) -> bool:
        return self.m == 0

    @property
    def share(self) -> float | None:
        """The share of weights an N:M pattern zeroes; None for unstructured (the target sets it)."""
        return None if self.unstructured else 1 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.unstructured else f"{self.n}:{self.m}"


def parse_pattern(text: str) -> Pattern | None:
    """`channel` (None: channel pruning, no zeros), `unstructured`, or `N:M` with 0 < N < M."""
    if text == "channel":
        return None
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text or "")
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise UsageError(f"granularity must be channel, unstructured or N:M with 0 < N < M (2:4, 4:8, 1:4), "
                         f"got '{text}'")
    return Pattern(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class Request:
    """One sparsity step: the `pattern`, the `criterion`, the share of each layer's weights to zero (`ratio`: the
    N:M share, or --ratio) or the fraction of the model's non-zero parameters to keep (`keep_params`), how the
    share is spread over layers (`allocation`), and whether kept weights are re-fitted by least squares (`refit`)."""

    pattern: Pattern
    criterion: str = "l1"
    ratio: float | None = None
    keep_params: float | None = None
    allocation: str = "uniform"
    refit: bool = False
    exclude: tuple[str, ...] = ()

    @property
    def needs_data(self) -> bool:
        return self.criterion in DATA_CRITERIA or self.refit or self.allocation == "sensitivity"
