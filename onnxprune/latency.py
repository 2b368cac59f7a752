"""A cost model that measures: onnxruntime latency of the whole model pruned to given channel counts, on this
machine. It sees what MACs miss (channel alignment, depthwise and memory-bound layers, fused kernels), at the price
of one measurement per configuration, so the allocation searches it with fewer bisection steps."""
from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import onnx

from .allocate import Plan
from .groups import Analysis
from .surgery import apply_plan
from .verify import random_feeds, session


class LatencyModel:
    steps = 12  # bisection steps: each costs a surgery and a measurement

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, threads: int = 1, runs: int = 15):
        self.model, self.analysis, self.threads, self.runs = model, analysis, threads, runs
        self.feed = random_feeds(model)
        self.cache: dict[tuple, float] = {}

    def cost(self, counts: dict[int, int]) -> float:
        """Median milliseconds of the model when group g keeps counts[g] channels (which ones does not matter)."""
        key = tuple(sorted((g, n) for g, n in counts.items() if n < self.analysis.groups[g].size))
        if key not in self.cache:
            plan = Plan({g: np.arange(n) for g, n in key})
            model = apply_plan(copy.deepcopy(self.model), self.analysis, plan) if key else self.model
            self.cache[key] = self._median_ms(model)
        return self.cache[key]

    def _median_ms(self, model: onnx.ModelProto) -> float:
        sess = session(model, threads=self.threads)
        for _ in range(3):
            sess.run(None, self.feed)
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            sess.run(None, self.feed)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
