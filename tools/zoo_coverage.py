"""Coverage of the exported zoo: groups, what is frozen and why, MACs and latency before and after.

    python tools/zoo_coverage.py [--ratio 0.5] [--runs 10] [--only resnet50,vit_b_16] [--out coverage.json]
    python tools/zoo_coverage.py --frameworks --runs 0 --out coverage.json --freezes freezes.md   # issue 10

Each skeleton in models/zoo is materialised with seeded random weights (a wheel model at its recorded example input
sizes, as tests/test_zoo.py does) and pruned with the default options (`--criterion l1`, rounding to 16) at the
given ratio. Prunable MACs are those of Conv/ConvTranspose/Gemm/MatMul nodes whose input or output channels belong
to a prunable group (`onnxprune.analyze(model).mac_reach`, as `onnxprune analyze` prints them). Latency:
onnxruntime, 1 thread, original and pruned runs interleaved after a warm-up, median of --runs each (0: not measured).

`--frameworks` covers the exports of tools/export_frameworks.py (timm, Keras, JAX, Paddle, wheels) and checks each
as tests/test_zoo.py does: *valid* (full checker, strict shape inference, same inputs and outputs, onnxruntime runs
it) and *exact* (`prune_exact` with the groups marked inexact left out, and listed). A model whose pruning fails is
a row with the error, not the end of the run. `--freezes FILE` writes which freeze reasons stop which models, most
frequent first.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_prune import latency_pair  # noqa: E402
from export_frameworks import framework_files  # noqa: E402
from exactness import prune_exact  # noqa: E402
from test_zoo import zoo_model  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune import Options  # noqa: E402
from onnxprune.report import PruneReport  # noqa: E402
from onnxprune.verify import check_valid, io_signature, random_feeds, run  # noqa: E402

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
    return pruned_row(zoo_model(path), path, ratio, runs)[0]


def pruned_row(model: onnx.ModelProto, path: Path, ratio: float,
               runs: int) -> tuple[dict, onnx.ModelProto, PruneReport]:
    """The model pruned at `ratio` with the default options, its coverage row, and the report."""
    start = time.perf_counter()
    pruned, report = onnxprune.prune(model, ratio, Options())
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
            "prunable_macs": onnxprune.analyze(model).mac_reach.share, "ms": (before * 1e3, after * 1e3),
            "prune_s": seconds}, pruned, report


def without_names(reason: str) -> str:
    """A reason with the node and tensor names left out ('...'), so that reasons of one kind count together."""
    return re.sub(r"(?:^| )\(?'[^']*'\)?", "", reason).strip()


def _error(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def validity(model: onnx.ModelProto, pruned: onnx.ModelProto) -> str:
    """'' where the pruned model is valid as tests/test_zoo.py requires, else the first failure."""
    try:
        check_valid(pruned)
        onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
        assert io_signature(pruned) == io_signature(model), "inputs or outputs changed"
        run(pruned, random_feeds(model))
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return _error(exc)
    return ""


def exactness(model: onnx.ModelProto, ratio: float) -> str:
    """'' where pruning the zeroed original gives its outputs (inexact groups left out), else the failure."""
    try:
        prune_exact(model, ratio=ratio, atol=1e-3, batch=1, exact_groups_only=True)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return _error(exc)
    return ""


def cover_framework(path: Path, ratio: float, runs: int) -> dict:
    """cover() and the checks of tests/test_zoo.py, for one export of another framework; a failure is a row."""
    name, exporter = path.stem.rsplit(".", 1)
    try:
        model = zoo_model(path)
        row, pruned, report = pruned_row(model, path, ratio, runs)
    except Exception as exc:  # noqa: BLE001 - a crash of the pruner is the finding
        return {"model": name, "exporter": exporter, "error": _error(exc), "valid": False, "exact": False}
    row["valid_error"] = validity(model, pruned)
    row["exact_error"] = exactness(model, ratio)
    row["valid"], row["exact"] = not row["valid_error"], not row["exact_error"]
    row["inexact_reasons"] = Counter(without_names(r) for g in report.groups for r in g["inexact"]).most_common()
    row["all_reasons"] = Counter(reason_kind(g["frozen"][0]) for g in report.frozen_groups).most_common()
    return row


def mac_cut(row: dict) -> float:
    before, after = row.get("macs", (0, 0))
    return before / after if after else float("nan")


def framework_markdown(rows: list[dict]) -> str:
    """The issue-10 table: model, exporter, prunable MACs, MAC cut, valid, exact, top freeze reasons."""
    lines = ["| model | exporter | prunable MACs | MAC cut at 0.5 | valid | exact | top freeze reasons |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | - | - | no | no | crash: {r['error']} |")
            continue
        reasons = "; ".join(f"{k} ({n})" for k, n in r["reasons"] if not k.startswith("graph ")) or "-"
        exact = "yes" if r["exact"] else f"no: {r['exact_error'][:120]}"
        inexact = "; ".join(f"{k} ({n})" for k, n in r["inexact_reasons"])
        exact += f"; {r['inexact']} groups inexact: {inexact}" if r["inexact"] else ""
        valid = "yes" if r["valid"] else f"no: {r['valid_error'][:120]}"
        lines.append(f"| {r['model']} | {r['exporter']} | {r['prunable_macs']:.0%} | {mac_cut(r):.2f}x | {valid} "
                     f"| {exact} | {reasons} |")
    met = sum(mac_cut(r) >= 1.5 for r in rows if "error" not in r)
    return "\n".join(lines + ["", f"{met} of {len(rows)} models lose at least 1.5x of their MACs at this ratio."])


def freeze_summary(rows: list[dict]) -> str:
    """Markdown: each freeze reason with the models it stops (groups frozen), most models first."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for kind, n in r.get("all_reasons", []):
            if not kind.startswith("graph "):
                by_reason[kind].append(f"{r['model']}.{r['exporter']} ({n})")
    lines = ["# Freeze reasons across the issue-10 exports (reason -> models, groups frozen)", ""]
    for kind, models in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- **{kind}** ({len(models)} models): {', '.join(models)}")
    crashes = [f"{r['model']}.{r['exporter']}: {r['error']}" for r in rows if "error" in r]
    failures = [f"{r['model']}.{r['exporter']}: {r.get('valid_error') or r.get('exact_error')}" for r in rows
                if "error" not in r and not (r["valid"] and r["exact"])]
    lines += ["", "## Crashes", ""] + [f"- {c}" for c in crashes] + ["", "## Invalid or inexact", ""]
    return "\n".join(lines + [f"- {f}" for f in failures] + [""])


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
    parser.add_argument("--frameworks", action="store_true", help="the exports of tools/export_frameworks.py")
    parser.add_argument("--freezes", type=Path, help="with --frameworks: write the freeze reasons -> models here")
    args = parser.parse_args()
    only = [o for o in args.only.split(",") if o]
    zoo = ROOT / "models" / "zoo"
    paths = framework_files(zoo) if args.frameworks else sorted(zoo.glob("*.onnx"))
    paths = [p for p in paths if not only or p.name.split(".")[0] in only]
    rows = []
    for path in paths:
        rows.append(cover_framework(path, args.ratio, args.runs) if args.frameworks else cover(path, args.ratio,
                                                                                                 args.runs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
        if args.freezes:
            args.freezes.write_text(freeze_summary(rows))
    print(framework_markdown(rows) if args.frameworks else markdown(rows))


if __name__ == "__main__":
    main()
