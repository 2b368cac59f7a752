"""Coverage of the exported zoo: groups, what is frozen and why, MACs and latency before and after.

    python tools/zoo_coverage.py [--ratio 0.5] [--runs 10] [--only resnet50,vit_b_16] [--out coverage.json]

Each skeleton in models/zoo is materialised with seeded random weights and pruned with `--criterion l1` at the
given ratio (default rounding). Prunable MACs are those of Conv/ConvTranspose/Gemm/MatMul nodes whose input or output
channels belong to a prunable group (`onnxprune.analyze(model).mac_reach`, as `onnxprune analyze` prints them).
Latency: onnxruntime, 1 thread, original and pruned runs interleaved after a warm-up, median of --runs each.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import latency_pair  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune import Options  # noqa: E402
from onnxprune.testing.skeleton import materialize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def reason_kind(reason: str) -> str:
    """Shorten a freeze reason to its cause, without node names."""
    if reason.startswith("graph "):
        return reason.split(" '")[0]
    cause = reason.split(": ", 1)[1] if ": " in reason else reason
    op = reason.split(" ", 1)[0]
    if "does not carry axis" in reason:
        return f"{op} fixes the axis"
    return f"{op}: {cause.split(' (')[0]}"


def cover(path: Path, ratio: float, runs: int) -> dict:
    model = materialize(onnx.load(path))
    start = time.perf_counter()
    pruned, report = onnxprune.prune(model, ratio, Options(criterion="l1"))
    seconds = time.perf_counter() - start
    before, after = latency_pair(model, pruned, runs) if runs else (float("nan"), float("nan"))
    reasons = Counter()
    for g in report.frozen_groups:
        reasons[reason_kind(g["frozen"][0])] += 1
    name, exporter = path.stem.rsplit(".", 1)
    return {"model": name, "exporter": exporter, "groups": len(report.groups), "pruned": len(report.pruned_groups),
            "frozen": len(report.frozen_groups), "reasons": reasons.most_common(3),
            "inexact": sum(bool(g["inexact"]) for g in report.groups),
            "params": (report.params_before, report.params_after), "macs": (report.macs_before, report.macs_after),
            "prunable_macs": onnxprune.analyze(model).mac_reach.share, "ms": (before * 1e3, after * 1e3), "prune_s": seconds}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | exp. | groups / pruned / frozen | prunable MACs | params M | GMACs | ORT ms (1 thread) "
             "| speed-up / MAC cut | prune s | top freeze reasons |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pb, pa = (x / 1e6 for x in r["params"])
        mb, ma = (x / 1e9 for x in r["macs"])
        tb, ta = r["ms"]
        speed = (tb / ta) / (mb / ma) if ma and ta == ta else float("nan")
        reasons = "; ".join(f"{k} ({n})" for k, n in r["reasons"] if not k.startswith("graph ")) or "-"
        inexact = f", {r['inexact']} inexact" if r["inexact"] else ""
        lines.append(f"| {r['model']} | {r['exporter']} | {r['groups']} / {r['pruned']} / {r['frozen']}{inexact} "
                     f"| {r['prunable_macs']:.0%} | {pb:.1f} → {pa:.1f} | {mb:.2f} → {ma:.2f} | {tb:.1f} → {ta:.1f} "
                     f"| {speed:.2f} | {r['prune_s']:.2f} | {reasons} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    only = [o for o in args.only.split(",") if o]
    paths = [p for p in sorted((ROOT / "models" / "zoo").glob("*.onnx"))
             if not only or p.name.split(".")[0] in only]
    rows = []
    for path in paths:
        rows.append(cover(path, args.ratio, args.runs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
