"""Transformer head and neuron scores with bias compensation on all-MiniLM-L6-v2 (issue 14): FLAP's fluctuation
criterion (An et al. 2024) with and without its standardised allocation, against the reconstruction criterion
(regression) with bias or least-squares recovery and the l1 defaults, at 0.75, 0.67 and 0.5 of the MACs.

    python tools/bench_flap.py [--fractions 0.75,0.67,0.5] [--calib-size 64] [--eval-size 128]
                               [--configs fluctuation/uniform/bias,fluctuation/standardised/bias,...]
    python tools/bench_flap.py --curves [--calib-size 64]

--curves times the sensitivity curves of --allocation sensitivity (l1 scores, the first --calib-size calibration
sentences, padding cut) from one session with zeroed constants (sensitivity.ZeroedRuns) and with every point pruned
and run in a session of its own, and says how far their damages differ and whether the counts chosen at
--fractions agree.

Calibration: the first --calib-size sentences of /tmp/minilm/calib.npz; evaluation: the first --eval-size sentences
of /tmp/minilm/eval.npz (disjoint files), cosine of each pruned embedding to the original's and retrieval agreement
(see tools/bench_recipe.py). MACs at batch 1 x 64 tokens. Seconds: the whole prune (statistics, allocation,
recovery). Export the model first (tools/export_minilm.py).
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import MiniLM  # noqa: E402  (tools/ is not a package)

import onnxprune  # noqa: E402
from onnxprune import CalibrationSource, Options, Target  # noqa: E402
from onnxprune.pipeline import SENSITIVITY_SAMPLES, mac_model_of, open_inputs, score  # noqa: E402
from onnxprune.surgery import apply_plan  # noqa: E402

sensitivity = sys.modules["onnxprune.sensitivity"]  # the module (onnxprune.sensitivity is also the API's function)

CONFIGS = ("l1/uniform/none", "fluctuation/uniform/bias", "fluctuation/standardised/bias",
           "regression/uniform/bias", "regression/uniform/lsq")


def row(bench: MiniLM, config: str, fraction: float, calib_size: int) -> str:
    criterion, allocation, recover = config.split("/")
    options = Options(criterion=criterion, allocation=allocation, recover=recover, quiet=True,
                      calib=CalibrationSource(bench.calib, size=calib_size))
    start = time.perf_counter()
    pruned, report = onnxprune.prune(bench.model, Target.macs(fraction), options)
    seconds = time.perf_counter() - start
    kept = bench.macs(pruned) / bench.macs(bench.model)
    cells = (fraction, config, bench.measure(pruned), f"{kept:.1%}", f"{seconds:.1f}", report.recovered_layers)
    return "| " + " | ".join(str(c) for c in cells) + " |"


def curves(bench: MiniLM, fractions: list[float], calib_size: int, pruned: bool) -> tuple[dict, dict, float, float]:
    """The sensitivity curves, the counts chosen at each fraction, and the wall and CPU seconds of the curves."""
    options = Options(calib=CalibrationSource(bench.calib, size=calib_size), recover="lsq")  # replayable data
    inputs = open_inputs(bench.model, Target.macs(0.5), options)
    scores, mac_model = score(inputs, options, None).values, mac_model_of(inputs)
    feeds = list(inputs.calibration.batches(SENSITIVITY_SAMPLES))
    real = sensitivity.ZeroedRuns.outputs
    if pruned:
        sensitivity.ZeroedRuns.outputs = lambda runs, group, plan, batches: sensitivity.model_outputs(
            apply_plan(copy.deepcopy(runs.model), runs.analysis, plan), batches)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        found = sensitivity.sensitivity_curves(inputs.model, inputs.analysis, scores, feeds, 16, mac_model)
    finally:
        sensitivity.ZeroedRuns.outputs = real
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    counts = {f: sensitivity.sensitivity_counts(inputs.analysis, found, mac_model, None, f) for f in fractions}
    return found, counts, wall, cpu


def compare_curves(bench: MiniLM, fractions: list[float], calib_size: int) -> None:
    shared, shared_counts, *shared_seconds = curves(bench, fractions, calib_size, pruned=False)
    alone, alone_counts, *alone_seconds = curves(bench, fractions, calib_size, pruned=True)
    damages = [(a["damage"], b["damage"]) for g in shared for a, b in zip(shared[g], alone[g])]
    worst = max(abs(a - b) / max(b, 1e-12) for a, b in damages)
    print(f"{len(damages)} points; one session: {shared_seconds[0]:.1f} s wall, {shared_seconds[1]:.1f} s CPU; "
          f"each pruned: {alone_seconds[0]:.1f} s wall, {alone_seconds[1]:.1f} s CPU")
    print(f"largest relative damage difference {worst:.2g}; counts at {fractions} "
          f"{'agree' if shared_counts == alone_counts else 'DIFFER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.75,0.67,0.5")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--curves", action="store_true", help="time the sensitivity curves instead (see above)")
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    bench = MiniLM(args.eval_size)
    if args.curves:
        return compare_curves(bench, [float(f) for f in args.fractions.split(",")], args.calib_size)
    print(f"calibration: first {args.calib_size} sentences; evaluation: first {args.eval_size} held-out sentences\n")
    print("| MACs target | criterion/allocation/recover | cos / top-1 agree | MACs kept | seconds | layers recovered |",
          "|---|---|---|---|---|---|", sep="\n", flush=True)
    for fraction in (float(f) for f in args.fractions.split(",")):
        for config in args.configs.split(","):
            print(row(bench, config, fraction, args.calib_size), flush=True)


if __name__ == "__main__":
    main()
