"""The property suite's strategies (tests/graphgen.py) for a long run: random small graphs of the supported ops
with random ratios, criteria, allocations and recoveries, through `onnxprune.prune`, until a number of examples or
a time budget is spent. Prints the counts: examples, valid and exact, valid (re-fitted), clean errors and
internal errors (anything else: an exception that is not a clean OnnxPruneError, an invalid model, an inexact one). Failing models are written to
--keep for reproduction.

    nice -n 10 python tools/fuzz_graphs.py --minutes 10 [--examples N] [--seed S] [--keep DIR]
"""
from __future__ import annotations

import argparse
import collections
import re
import logging
import sys
import time
import traceback
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as seed_fn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from graphgen import Run, check_run, runs  # noqa: E402


def fuzz(deadline: float, examples: int, seed: int, keep: Path | None) -> collections.Counter:
    """Batches of 50 examples, each batch seeded from `seed`, until `examples` or the deadline."""
    counts: collections.Counter = collections.Counter()
    failures: dict[str, int] = {}
    errors: list[str] = []
    batch = 0
    while counts["examples"] < examples and time.monotonic() < deadline:
        _batch(seed * 100_000 + batch, min(50, examples - counts["examples"]), counts, failures, errors, keep)
        batch += 1
    counts["distinct internal errors"] = len(failures)
    for message, n in collections.Counter(re.sub(r"[0-9.]+", "#", e)[:110] for e in errors).most_common(8):
        print(f"clean error x{n}: {message}")
    return counts


def _batch(seed: int, size: int, counts: collections.Counter, failures: dict[str, int], errors: list[str],
           keep: Path | None) -> None:
    @settings(max_examples=size, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(runs())
    def one(r: Run) -> None:
        counts["examples"] += 1
        try:
            counts[check_run(r, errors)] += 1
        except Exception as exc:  # an internal error: counted and kept, never shrunk (keep going)
            counts["internal"] += 1
            _report(r, exc, failures, keep)

    seed_fn(seed)(one)()


def _report(r: Run, exc: Exception, failures: dict[str, int], keep: Path | None) -> None:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    key = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
    failures[key] = failures.get(key, 0) + 1
    if failures[key] > 1:
        return
    o = r.options
    print(f"INTERNAL {key}: {str(exc)[:300]}\n  ops={r.drawn.ops} target={r.target} criterion={o.criterion} recover={o.recover} "
          f"round_to={o.round_to} allocation={o.allocation} schedule={o.schedule}/{o.steps} seed={o.seed}", flush=True)
    print("  " + "".join(traceback.format_exception(exc)[-3:]).replace("\n", "\n  "), flush=True)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        onnx.save(r.drawn.model, str(keep / f"failure{len(failures)}.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    start = time.monotonic()
    counts = fuzz(start + args.minutes * 60, args.examples, args.seed, args.keep)
    print(f"{time.monotonic() - start:.0f} s, seed {args.seed}: {counts['examples']} examples; "
          f"{counts['exact']} valid and exact, {counts['valid']} valid (re-fitted), {counts['error']} clean errors, "
          f"{counts['internal']} internal errors "
          f"({counts['distinct internal errors']} distinct)")


if __name__ == "__main__":
    main()
