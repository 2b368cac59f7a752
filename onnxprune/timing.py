"""The one onnxruntime timing loop: warm-up, timed runs, median; one model alone or two compared.

`onnxprune check --latency`, the latency table's one-layer and whole-model measurements and the benchmarks in
tools/ all time through here. `OrtTimer` is what the latency table is given; a deterministic stand-in with the same
two methods (`ModelTimer`) replaces onnxruntime in tests.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx

from .verify import session

Feed = dict[str, np.ndarray]
Clock = Callable[[], float]
BLOCKS = 3  # alternating blocks per model when timing with several threads
WARM_UP = 3  # untimed runs of each model before a comparison


class Runner(Protocol):
    """What is timed: an onnxruntime InferenceSession, or a stand-in."""

    def run(self, outputs: list[str] | None, feed: Feed) -> list: ...


Opener = Callable[[onnx.ModelProto, int], Runner]  # (model, intra-op threads) -> session


class ModelTimer(Protocol):
    """Milliseconds of models on this machine, at a fixed number of intra-op threads."""

    threads: int

    def model_ms(self, model: onnx.ModelProto, feed: Feed) -> float:
        """Median milliseconds of one run of `model` on `feed`."""

    def kept(self, original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Feed, runs: int) -> float:
        """Median latency of `pruned` as a fraction of `original`'s, timed so that the machine's drift cancels."""


@dataclass(frozen=True)
class OrtTimer:
    """`ModelTimer` on onnxruntime's CPU provider."""

    threads: int = 1

    def model_ms(self, model: onnx.ModelProto, feed: Feed) -> float:
        return median_ms(session(model, threads=self.threads), feed)

    def kept(self, original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Feed, runs: int) -> float:
        timing = measure_latency(original, pruned, feed, self.threads, runs)
        return timing["after_ms"]["median"] / timing["before_ms"]["median"]


def timed_run(sess: Runner, feed: Feed, clock: Clock = time.perf_counter) -> float:
    """Milliseconds of one `sess.run`."""
    start = clock()
    sess.run(None, feed)
    return (clock() - start) * 1e3


def warm_up(sessions: list[Runner], feed: Feed, rounds: int = WARM_UP) -> None:
    for _ in range(rounds):
        for sess in sessions:
            sess.run(None, feed)


def median_ms(sess: Runner, feed: Feed, runs: int = 5, min_total_ms: float = 3.0, clock: Clock = time.perf_counter) -> float:
    """Median milliseconds of `sess.run` after a warm-up; runs more than `runs` times when a run is short (at most
    200 runs), so that a fast one-layer model is timed over at least `min_total_ms`."""
    warm_up([sess], feed, rounds=1)
    times: list[float] = []
    while len(times) < runs or (sum(times) < min_total_ms and len(times) < 200):
        times.append(timed_run(sess, feed, clock))
    return statistics.median(times)


def measure_latency(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: Feed, threads: int, runs: int,
                    open_session: Opener = session, clock: Clock = time.perf_counter) -> dict:
    """Median and p90 over `runs` runs each, after a warm-up, with `threads` intra-op threads. With one thread the
    two models run interleaved, run by run, so that the machine's drift cancels; with more, in alternating blocks
    with one session alive at a time: onnxruntime's worker threads spin after a run, and the other session's would
    take the cores (two sessions of one model, interleaved at 2 threads, each ran at half speed)."""
    models = (original, pruned)
    if threads == 1:
        times = _interleaved([open_session(m, threads) for m in models], feed, runs, clock)
    else:
        times = _alternating_blocks(models, feed, threads, runs, open_session, clock)
    before, after = ({"median": statistics.median(t), "p90": float(np.percentile(t, 90))} for t in times)
    return {"threads": threads, "runs": len(times[0]), "before_ms": before, "after_ms": after,
            "speedup": before["median"] / after["median"]}


def _interleaved(sessions: list[Runner], feed: Feed, runs: int, clock: Clock) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    warm_up(sessions, feed)
    for _ in range(runs):
        for sess, acc in zip(sessions, times):
            acc.append(timed_run(sess, feed, clock))
    return times


def _alternating_blocks(models: tuple[onnx.ModelProto, onnx.ModelProto], feed: Feed, threads: int, runs: int,
                        open_session: Opener, clock: Clock) -> tuple[list[float], list[float]]:
    """`BLOCKS` blocks per model of ceil(runs / BLOCKS) runs, one session alive at a time."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(BLOCKS):
        for model, acc in zip(models, times):
            sess = open_session(model, threads)
            warm_up([sess], feed)
            acc.extend(timed_run(sess, feed, clock) for _ in range(-(-runs // BLOCKS)))
            del sess
    return times
