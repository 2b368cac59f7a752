"""Show that a change of code changed no result: prune the same models with the same options at two revisions and
compare the written models, plans and reports byte for byte.

    python tools/same_results.py --against REV [--cases all|quick] [--keep DIR] [--time resnet50,mobilenet_v2]

The revision REV is checked out into a temporary git worktree; each revision runs every case through the CLI
(`onnxprune IN.onnx ... -o OUT --report R --plan-out P`) in its own interpreter, and prints, per case, the SHA-256
of the pruned model, of the plan and of the report without its wall time. Exit 0 when every case matches.
Cases: the digits model with every criterion, allocation, recovery and schedule; every zoo skeleton (materialised
with seed 0) at --ratio 0.5 and, for a few, with data-driven criteria and recovery on random calibration data;
a small transformer built in code. Latency targets are left out: they are measured, not computed.
With --time, the in-memory `prune(model, 0.5)` of those zoo models is also timed at both revisions (median of 5
after a first call, the revisions alternating three times, the fastest median of each kept), so that a refactoring
can show it costs no time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ["models/digits_cnn.onnx"]
CALIB = ["--calib", "models/digits_cnn.calib.npz"]

DIGITS_CASES = {
    "digits-l1": ["--ratio", "0.5"],
    "digits-l2-r1": ["--ratio", "0.3", "--criterion", "l2", "--round-to", "1"],
    "digits-random": ["--ratio", "0.5", "--criterion", "random", "--seed", "3", "--round-to", "4"],
    "digits-bn": ["--ratio", "0.5", "--criterion", "bn", "--round-to", "1"],
    "digits-apoz-bias": ["--ratio", "0.5", "--criterion", "apoz", "--recover", "bias", "--round-to", "1", *CALIB],
    "digits-activation-global": ["--ratio", "0.5", "--criterion", "activation", "--allocation", "global", *CALIB],
    "digits-lsq": ["--ratio", "0.5", "--recover", "lsq", *CALIB],
    "digits-regression-lsq": ["--ratio", "0.5", "--criterion", "regression", "--recover", "lsq", "--round-to", "1",
                              *CALIB],
    "digits-regression-global-macs": ["--target-macs", "0.5", "--criterion", "regression", "--allocation", "global",
                                      "--round-to", "1", *CALIB],
    "digits-sensitivity": ["--target-macs", "0.5", "--allocation", "sensitivity", "--round-to", "1", *CALIB],
    "digits-iterative": ["--ratio", "0.5", "--schedule", "iterative", "--steps", "3", "--recover", "bias",
                         "--round-to", "1", *CALIB],
    "digits-iterative-macs": ["--target-macs", "0.4", "--schedule", "iterative", "--steps", "2", "--round-to", "1"],
    "digits-exclude": ["--ratio", "0.5", "--exclude", "conv2*", "--round-to", "1"],
}

ZOO_DATA_CASES = {  # zoo models small enough to calibrate quickly on random data
    "mobilenet_v3_small.ts": ["--ratio", "0.5", "--criterion", "regression", "--recover", "lsq"],
    "resnet18.dynamo": ["--ratio", "0.5", "--criterion", "apoz", "--recover", "bias"],
    "squeezenet1_1.ts": ["--target-macs", "0.5", "--allocation", "global", "--criterion", "activation",
                         "--recover", "lsq", "--round-to", "1"],
    "shufflenet_v2_x1_0.dynamo": ["--target-macs", "0.6", "--allocation", "sensitivity", "--round-to", "8"],
}

RUNNER = r'''
import hashlib, json, sys, os
import numpy as np, onnx
from click.testing import CliRunner
from onnxprune.cli import cli
try:
    from onnxprune.testing.skeleton import materialize
except ImportError:
    from onnxprune.skeleton import materialize

cases, work = json.loads(sys.argv[1]), sys.argv[2]

def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16] if os.path.exists(path) else None

results = {}
for name, (model, args, calib) in cases.items():
    if model.endswith(".skeleton"):
        source = os.path.join(work, name + ".onnx")
        if not os.path.exists(source):
            onnx.save(materialize(onnx.load(model[:-len(".skeleton")]), seed=0), source)
        model = source
    out, report, plan = (os.path.join(work, f"{name}.{k}") for k in ("out.onnx", "report.json", "plan.json"))
    if calib:
        loaded = onnx.load(model, load_external_data=False)
        inits = {i.name for i in loaded.graph.initializer}
        feeds = {}
        rng = np.random.default_rng(0)
        for vi in loaded.graph.input:
            if vi.name in inits:
                continue
            dims = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = rng.standard_normal([calib] + dims[1:]).astype(np.float32)
        np.savez(os.path.join(work, name + ".calib.npz"), **feeds)
        args = args + ["--calib", os.path.join(work, name + ".calib.npz")]
    result = CliRunner().invoke(cli, [model, *args, "-q", "-o", out, "--report", report, "--plan-out", plan])
    entry = {"exit": result.exit_code, "model": digest(out), "plan": digest(plan)}
    if os.path.exists(report):
        data = json.load(open(report))
        data.pop("seconds", None)
        entry["report"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    if result.exit_code:
        entry["error"] = (result.output or repr(result.exception)).strip().splitlines()[-1][:200]
    results[name] = entry
    print(name, entry, file=sys.stderr, flush=True)
print(json.dumps(results))
'''


TIMER = r'''
import json, statistics, sys, time
import onnx, onnxprune
try:
    from onnxprune.testing.skeleton import materialize
except ImportError:
    from onnxprune.skeleton import materialize
medians = {}
for name in sys.argv[1].split(","):
    model = materialize(onnx.load(f"models/zoo/{name}.ts.onnx"), seed=0)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        onnxprune.prune(model, 0.5)
        times.append(time.perf_counter() - start)
    medians[name] = statistics.median(times[1:])
print(json.dumps(medians))
'''


def prune_seconds(checkouts: tuple[Path, Path], models: str, rounds: int = 3) -> list[dict[str, float]]:
    """Per checkout, the fastest of `rounds` medians of an in-memory prune, the checkouts alternating."""
    best: list[dict[str, float]] = [{}, {}]
    for _ in range(rounds):
        for k, checkout in enumerate(checkouts):
            done = subprocess.run([sys.executable, "-c", TIMER, models], cwd=checkout, stdout=subprocess.PIPE,
                                  env=dict(os.environ, PYTHONPATH=str(checkout)), check=True, text=True)
            for name, seconds in json.loads(done.stdout).items():
                best[k][name] = min(seconds, best[k].get(name, seconds))
    return best


def cases(which: str) -> dict[str, tuple[str, list[str], int]]:
    """name -> (model path relative to the checkout, CLI arguments, random calibration samples or 0)."""
    found = {name: (DIGITS[0], args, 0) for name, args in DIGITS_CASES.items()}
    if which == "quick":
        return found
    for path in sorted((ROOT / "models" / "zoo").glob("*.onnx")):
        stem = path.name[:-len(".onnx")]
        found[f"zoo-{stem}"] = (f"models/zoo/{path.name}.skeleton", ["--ratio", "0.5"], 0)
        if stem in ZOO_DATA_CASES:
            found[f"zoo-{stem}-data"] = (f"models/zoo/{path.name}.skeleton", ZOO_DATA_CASES[stem], 16)
    found["transformer-regression-lsq"] = ("tools/tiny_transformer.onnx", ["--ratio", "0.5", "--criterion",
                                           "regression", "--recover", "lsq", "--round-to", "1"], 32)
    return found


def run_at(checkout: Path, selected: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(selected), str(work)], cwd=checkout, env=env,
                          stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_transformer(path: Path) -> None:
    """One post-LN encoder block with 4 heads over a run-time sequence: MatMul layers with Add biases."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, heads, ff = 32, 4, 64
    inits, nodes = [], []

    def const(name, *shape, scale=0.2):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def linear(x, name, k, n):
        nodes.append(helper.make_node("MatMul", [x, const(name + "_w", k, n)], [name + "_mm"], name=name))
        nodes.append(helper.make_node("Add", [name + "_mm", const(name + "_b", n)], [name], name=name + "_add"))
        return name

    inits.append(numpy_helper.from_array(np.array([0, 0, heads, d // heads], np.int64), "split_shape"))
    inits.append(numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge_shape"))
    for part in "qkv":
        linear("x", part, d, d)
        nodes.append(helper.make_node("Reshape", [part, "split_shape"], [part + "_h"], name=part + "_reshape"))
        perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [part + "_h"], [part + "_t"], perm=perm, name=part + "_perm"))
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="scores"),
              helper.make_node("Softmax", ["scores"], ["attn"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["attn", "v_t"], ["ctx"], name="ctx"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_perm"),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"], name="ctx_merge")]
    linear("ctx_m", "o", d, d)
    nodes.append(helper.make_node("Add", ["x", "o"], ["res"], name="residual"))
    linear("res", "up", d, ff)
    nodes.append(helper.make_node("Relu", ["up"], ["act"], name="act"))
    linear("act", "down", ff, d)
    nodes.append(helper.make_node("Add", ["res", "down"], ["y"], name="residual2"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--cases", choices=("all", "quick"), default="all")
    parser.add_argument("--keep", type=Path, help="keep the pruned models and reports here")
    parser.add_argument("--time", metavar="MODELS", help="also time the in-memory prune of these zoo models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.against], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        try:
            selected = cases(args.cases)
            for checkout in (base, ROOT):
                tiny_transformer(checkout / "tools" / "tiny_transformer.onnx")
            before = run_at(base, selected, work / "before")
            after = run_at(ROOT, selected, work / "after")
            seconds = prune_seconds((base, ROOT), args.time) if args.time else None
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
            (ROOT / "tools" / "tiny_transformer.onnx").unlink(missing_ok=True)
    differ = [name for name in selected if before.get(name) != after.get(name)]
    for name in selected:
        mark = "DIFFERS" if name in differ else "same"
        print(f"{mark:8} {name:45} {after.get(name)}" + (f"\n{'':8} was {before.get(name)}" if name in differ else ""))
    print(f"{len(selected) - len(differ)} of {len(selected)} cases give the same model, plan and report")
    for name in (seconds[0] if seconds else {}):
        old, new = seconds[0][name], seconds[1][name]
        print(f"prune {name} in memory: {old:.3f} s at {args.against}, {new:.3f} s now ({new / old:.2f}x)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
