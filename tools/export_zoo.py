#!/usr/bin/env python
"""Export a zoo of torchvision models to ONNX and commit them as graph skeletons.

Each model is built with ``weights=None`` after ``torch.manual_seed(0)``, put in
eval mode and exported at opset 17, batch 1, input "input" / output "output",
with the TorchScript exporter (``dynamo=False``, file suffix ``.ts.onnx``) and
the dynamo exporter (``dynamo=True``, ``.dynamo.onnx``). Each export is checked
(``onnx.checker`` full check, onnxruntime vs torch on a random input), stripped
with ``onnxprune.testing.skeleton.strip_weights`` and written to ``<out>/<model>.<ts|dynamo>.onnx``.
The skeleton is verified too: ``materialize(strip_weights(m))`` must have the
same initializers (name/shape/dtype) as ``m`` and give finite onnxruntime output.
``resnet18_bn`` is an extra TorchScript export of resnet18 that keeps its
BatchNormalization nodes (``training=TrainingMode.PRESERVE``).

Before export, parameters left constant by ``weights=None`` (norm layers, zero
biases/heads) are perturbed deterministically (``_perturb_params``; disable with
``--no-perturb``) so the graphs look like trained ones: otherwise the TorchScript
exporter de-duplicates equal initializers into ``Identity`` chains and ViT's zero
head makes the torch/onnxruntime comparison vacuous. The dynamo exporter only
emits opset >= 18: it is asked for 18 and the optimized model is converted to 17
with onnx's version converter (kept at 18, with a note, where that fails). Of its
per-node metadata only "namespace" and the rewriter rule names are kept.

Every (model, exporter) pair runs in its own subprocess, so a crash, hang or
failure of one export does not stop the others; a summary table is printed at
the end and ``<out>/README.md`` is regenerated from the files present.

Environment (torch must NOT go into the system Python; CPU only is fine)::

    python -m venv /work/venv-tv
    /work/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venv-tv/bin/pip install onnx onnxruntime numpy onnxscript
    # used for the committed zoo: onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2

Usage (from the repository root)::

    /work/venv-tv/bin/python tools/export_zoo.py [--out models/zoo] \
        [--only name1,name2] [--exporter ts|dynamo|both] > /tmp/zoo.log 2>&1
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_skeleton_module():
    """Import onnxprune/testing/skeleton.py by path (it needs only onnx + numpy), so the
    rest of the onnxprune package and its dependencies are not required here."""
    path = REPO / "onnxprune" / "testing" / "skeleton.py"
    spec = importlib.util.spec_from_file_location("_onnxprune_skeleton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_frameworks_module():
    """tools/export_frameworks.py, which writes the README's section about the other frameworks' exports."""
    path = REPO / "tools" / "export_frameworks.py"
    spec = importlib.util.spec_from_file_location("_export_frameworks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# name -> (input H/W, kind); kind: "cls" classification, "seg" segmentation
MODELS = {
    "resnet18": (224, "cls"),
    "resnet50": (224, "cls"),
    "resnext50_32x4d": (224, "cls"),
    "wide_resnet50_2": (224, "cls"),
    "mobilenet_v2": (224, "cls"),
    "mobilenet_v3_small": (224, "cls"),
    "mobilenet_v3_large": (224, "cls"),
    "efficientnet_b0": (224, "cls"),
    "efficientnet_v2_s": (224, "cls"),
    "densenet121": (224, "cls"),
    "googlenet": (224, "cls"),
    "inception_v3": (299, "cls"),
    "shufflenet_v2_x1_0": (224, "cls"),
    "squeezenet1_1": (224, "cls"),
    "mnasnet1_0": (224, "cls"),
    "regnet_x_400mf": (224, "cls"),
    "regnet_y_400mf": (224, "cls"),
    "vgg11_bn": (224, "cls"),
    "alexnet": (224, "cls"),
    "convnext_tiny": (224, "cls"),
    "vit_b_16": (224, "cls"),
    "swin_t": (224, "cls"),
    "maxvit_t": (224, "cls"),
    "fcn_resnet50": (224, "seg"),
    "deeplabv3_mobilenet_v3_large": (224, "seg"),
    "lraspp_mobilenet_v3_large": (224, "seg"),
}
# Extra exports: name -> (base model, exporters allowed)
EXTRAS = {"resnet18_bn": ("resnet18", ("ts",))}
OPSET = 17


# --------------------------------------------------------------------------- #
# worker: one (model, exporter) export, in its own process
# --------------------------------------------------------------------------- #
def _perturb_params(model, seed: int = 0) -> int:
    """Make freshly initialised parameters look trained (deterministically).

    ``weights=None`` leaves many tensors constant (BN weight=1/bias=0/mean=0/
    var=1, LayerNorm ones/zeros, zero biases, ViT's zero head, ConvNeXt's 1e-6
    layer scale). The TorchScript exporter then de-duplicates equal initializers
    and inserts ``Identity`` nodes between unrelated layers, and a zero head makes
    the onnxruntime-vs-torch check vacuous. So: normalization layers get
    non-trivial affine params and running stats, and every other float
    parameter whose elements are all equal gets N(0, 0.02) noise added.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.modules.instancenorm._InstanceNorm)
    done, n = set(), 0
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, norm_types):
                continue
            for attr, kind in (("weight", "u"), ("bias", "n"), ("running_mean", "n"), ("running_var", "u")):
                t = getattr(mod, attr, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in done:
                    if kind == "u":
                        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                    else:
                        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
                    done.add(id(t))
                    n += 1
        for _, t in model.named_parameters():
            if id(t) in done or not t.is_floating_point() or t.numel() < 2:
                continue
            if bool(torch.all(t == t.reshape(-1)[0])):
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)
                n += 1
    return n


def _build(name: str, perturb: bool = True):
    import torch
    import torchvision

    base = EXTRAS.get(name, (name,))[0]
    size, kind = MODELS[base]
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if kind == "seg":
        kwargs["weights_backbone"] = None
    if base in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(base, **kwargs)

    if kind == "seg":
        class SegOut(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)["out"]

        model = SegOut(model)
    if perturb:
        _perturb_params(model)
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 3, size, size, generator=gen)
    return model, x


def _export(name: str, exporter: str, model, x, tmp: Path):
    import onnx
    import torch

    common = dict(input_names=["input"], output_names=["output"], opset_version=OPSET)
    if exporter == "ts":
        extra = {}
        if name == "resnet18_bn":
            extra["training"] = torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, **common, **extra)
    else:
        common["opset_version"] = max(OPSET, 18)  # converted to OPSET afterwards
        prog = torch.onnx.export(model, (x,), None, dynamo=True, **common)
        # save self-contained (all weights inline), then load as a plain ModelProto
        prog.save(str(tmp), external_data=False)
    return onnx.load(str(tmp))


# per-node metadata of the dynamo exporter that is kept (the rest -- stack traces
# with local paths, FX node dumps, class hierarchies, name scopes -- is bulky and
# redundant with "namespace")
KEEP_NODE_METADATA = {"namespace", "pkg.onnxscript.rewriter.rule_name"}


def _walk_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == a.GRAPH:
                yield from _walk_nodes(a.g)
            for g in a.graphs:
                yield from _walk_nodes(g)


def _clean_node_metadata(model) -> None:
    for node in _walk_nodes(model.graph):
        keep = [p for p in node.metadata_props if p.key in KEEP_NODE_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _to_opset(model, target: int):
    """Down-convert with onnx's version converter, keeping node metadata. The
    dynamo exporter has no opset-17 implementations: asked for 17 it exports 18
    and converts *before* optimizing, which fails more often (e.g. resnet18's
    ReduceMean) and drops node metadata; so it is asked for 18 and this converts
    the optimized model. Returns (model, note); on failure the original model and
    a note saying why."""
    import onnx
    import onnx.version_converter

    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if cur is None or cur <= target:
        return model, ""
    try:
        meta = {n.name: list(n.metadata_props) for n in _walk_nodes(model.graph) if n.name}
        conv = onnx.version_converter.convert_version(model, target)
        for n in _walk_nodes(conv.graph):  # the converter drops node metadata
            if n.name in meta and not n.metadata_props:
                n.metadata_props.extend(meta[n.name])
        # onnx's converter leaves opset-18-only attributes on Reduce* nodes
        for node in conv.graph.node:
            if node.op_type.startswith("Reduce") and node.domain in ("", "ai.onnx"):
                keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
                if len(keep) != len(node.attribute):
                    if any(a.name == "noop_with_empty_axes" and a.i for a in node.attribute):
                        raise RuntimeError("noop_with_empty_axes=1 cannot be expressed")
                    del node.attribute[:]
                    node.attribute.extend(keep)
        onnx.checker.check_model(conv, full_check=True)
        return conv, f"opset {cur}->{target} by onnx.version_converter"
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        first = first.split("failed: ", 1)[-1][:160]  # drop the C++ assertion prefix
        return model, f"kept opset {cur}: onnx.version_converter: {first}"


def _ort_run(model_bytes: bytes, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _initializer_sig(model):
    return {
        t.name: (int(t.data_type), tuple(int(d) for d in t.dims)) for t in model.graph.initializer
    }


def worker(name: str, exporter: str, out_dir: Path, perturb: bool = True) -> dict:
    import numpy as np
    import onnx
    import torch

    torch.set_num_threads(2)
    sk = _load_skeleton_module()
    res = {"model": name, "exporter": exporter, "ok": False, "reason": ""}
    t0 = time.time()
    model, x = _build(name, perturb)
    with torch.no_grad():
        ref = model(x).numpy()
    tmp = out_dir / f".tmp.{name}.{exporter}.onnx"
    try:
        m = _export(name, exporter, model, x, tmp)
    finally:
        for p in (tmp, Path(str(tmp) + ".data")):
            if p.exists():
                p.unlink()
    res["export_s"] = round(time.time() - t0, 1)
    if exporter == "dynamo":
        _clean_node_metadata(m)
        m, res["note"] = _to_opset(m, OPSET)
    res["opset"] = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    res["nodes"] = len(m.graph.node)
    res["ops"] = dict(collections.Counter(n.op_type for n in m.graph.node))
    res["full_mb"] = round(m.ByteSize() / 1e6, 1)

    # checker
    try:
        onnx.checker.check_model(m, full_check=True)
        res["checker"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        res["checker"] = "FAIL: " + str(e).strip().splitlines()[0][:200]

    if name == "resnet18_bn":
        nbn = res["ops"].get("BatchNormalization", 0)
        if nbn == 0:
            raise RuntimeError("resnet18_bn export has no BatchNormalization nodes")

    # onnxruntime vs torch
    (got,) = _ort_run(m.SerializeToString(), x.numpy())[:1]
    res["max_abs_diff"] = float(np.max(np.abs(got - ref)))
    res["ref_max_abs"] = float(np.max(np.abs(ref)))
    res["out_shape"] = list(got.shape)

    # skeleton + round trip
    s = sk.strip_weights(m)
    assert sk.is_skeleton(s)
    s_bytes = s.SerializeToString()
    mat = sk.materialize(onnx.load_from_string(s_bytes), seed=0)
    assert not sk.is_skeleton(mat)
    expect = _initializer_sig(m)
    recs = sk.skeleton_records(s)
    for rname, (dt, dims) in recs.items():
        if rname not in expect:  # was a Constant node
            expect[rname] = (dt, tuple(dims))
    got_sig = _initializer_sig(mat)
    if got_sig != expect:
        missing = sorted(set(expect) - set(got_sig))[:3]
        extra = sorted(set(got_sig) - set(expect))[:3]
        diff = sorted(k for k in set(expect) & set(got_sig) if expect[k] != got_sig[k])[:3]
        raise RuntimeError(f"materialize mismatch: missing={missing} extra={extra} diff={diff}")
    try:
        onnx.checker.check_model(mat, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError("materialized model fails checker: " + str(e).strip().splitlines()[0])
    (mout,) = _ort_run(mat.SerializeToString(), x.numpy())[:1]
    if not np.all(np.isfinite(mout)):
        raise RuntimeError("materialized model gives non-finite output")
    if mout.shape != got.shape:
        raise RuntimeError(f"materialized output shape {mout.shape} != {got.shape}")
    res["mat_out_max_abs"] = float(np.max(np.abs(mout)))
    res["mat_out_std"] = float(np.std(mout))
    res["stripped_tensors"] = len(recs)
    res["constants_stripped"] = sum(1 for k in recs if k not in _initializer_sig(m))

    path = out_dir / f"{name}.{exporter}.onnx"
    path.write_bytes(s_bytes)
    res["skeleton_kb"] = round(len(s_bytes) / 1024, 1)
    res["total_s"] = round(time.time() - t0, 1)
    res["ok"] = True
    return res


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #
def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # prefer the last exception line of a traceback, else the first line
    for ln in reversed(lines):
        if ln and not ln.startswith(("File ", "^", "~")) and ":" in ln and "Error" in ln.split(":")[0]:
            return ln[:240]
    return (lines[-1] if lines else "")[:240]


def run_one(name: str, exporter: str, out_dir: Path, timeout: int, perturb: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{name}:{exporter}", "--out", str(out_dir)]
    if not perturb:
        cmd.append("--no-perturb")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "exporter": exporter, "ok": False, "reason": f"timeout after {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout)[-4000:]
    return {
        "model": name,
        "exporter": exporter,
        "ok": False,
        "reason": f"rc={p.returncode}: " + _first_line(tail),
        "total_s": round(time.time() - t0, 1),
    }


def _fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))


def print_summary(results):
    header = ("model", "exp", "status", "opset", "nodes", "skel_KB", "max|diff|", "rel", "checker", "note/reason")
    rows = []
    for r in results:
        rows.append((
            r["model"], r["exporter"], "ok" if r["ok"] else "FAIL", r.get("opset", ""),
            r.get("nodes", ""), r.get("skeleton_kb", ""),
            f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "",
            f"{r['max_abs_diff'] / max(r['ref_max_abs'], 1e-30):.0e}" if "max_abs_diff" in r else "",
            (r.get("checker") or "")[:30], (r.get("reason") or r.get("note") or "")[:150],
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(_fmt_row(header, widths))
    print(_fmt_row(["-" * w for w in widths], widths))
    for row in rows:
        print(_fmt_row(row, widths))
    ok = sum(r["ok"] for r in results)
    print(f"\n{ok}/{len(results)} exports ok")


def write_readme(out_dir: Path) -> None:
    """Regenerate <out>/README.md from the skeleton files present."""
    import onnx

    sk = _load_skeleton_module()
    rows, total = [], 0
    frameworks = _load_frameworks_module()
    others = set(frameworks.framework_files(out_dir))
    for path in sorted(out_dir.glob("*.onnx")):
        if path.name.startswith(".tmp.") or path in others:
            continue
        m = onnx.load(str(path))
        size = path.stat().st_size
        total += size
        recs = sk.skeleton_records(m)
        params = sum(math.prod(d) for _, d in recs.values())
        opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), "")
        model, exporter = path.name[: -len(".onnx")].rsplit(".", 1)
        rows.append((model, exporter, opset, len(m.graph.node), f"{params / 1e6:.1f}", f"{size / 1024:.0f}"))
    lines = [
        "# ONNX model zoo (graph skeletons)",
        "",
        "Real torchvision models exported to ONNX (opset 17 requested, batch 1, input `input`, output `output`,",
        "`weights=None`, `torch.manual_seed(0)`, eval mode), with both the TorchScript exporter (`*.ts.onnx`,",
        "`dynamo=False`) and the dynamo exporter (`*.dynamo.onnx`). `resnet18_bn.ts.onnx` keeps its",
        "BatchNormalization nodes unfolded (`training=TrainingMode.PRESERVE`).",
        "",
        "These are **skeletons**: float tensors with >= 64 elements (other than mask-like ones with <= 16",
        "distinct values) were removed and recorded as shape/dtype in",
        "`metadata_props[\"onnxprune.skeleton\"]` (see `onnxprune/testing/skeleton.py`). Load them with",
        "`onnxprune.testing.skeleton.load_materialized(path, seed)` or `materialize(onnx.load(path), seed)` to get a",
        "runnable model with seeded random weights. Torch is not needed to use them.",
        "",
        "Notes:",
        "",
        "- Before export, parameters that `weights=None` leaves constant (norm layers, zero biases, ViT's zero",
        "  head) are perturbed deterministically, so the graphs look like trained ones (no `Identity` chains",
        "  from the TorchScript exporter de-duplicating equal initializers).",
        "- TorchScript exports fold BatchNormalization into Conv (except `resnet18_bn`); the dynamo exporter's",
        "  optimizer fuses it as well.",
        "- The dynamo exporter only emits opset >= 18; its output is converted to 17 with",
        "  `onnx.version_converter`. Where that has no adapter (Split/Pad: shufflenet_v2_x1_0, swin_t,",
        "  maxvit_t) the model stays at opset 18. Dynamo models keep the per-node `namespace` metadata",
        "  (torch module path) and rewriter rule names.",
        "- Every export was checked with `onnx.checker` (full check) and against torch with onnxruntime",
        "  (max relative diff <= 2e-6); every skeleton was materialized and run.",
        "",
        "Made with (see the docstring of `tools/export_zoo.py` for the environment):",
        "",
        "```",
        "/work/venv-tv/bin/python tools/export_zoo.py --out models/zoo --exporter both",
        "```",
        "",
        "torch 2.14.1, torchvision 0.29.1, onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2.",
        "",
        "| model | exporter | opset | nodes | params (M) | file KB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
    lines += ["", f"{len(rows)} files, {total / 1024 / 1024:.2f} MiB in total."]
    lines += frameworks.readme_section(out_dir) + [""]
    (out_dir / "README.md").write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "models" / "zoo"))
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--exporter", choices=["ts", "dynamo", "both"], default="both")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per export")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--json", default="", help="also write the results as JSON here")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate <out>/README.md")
    ap.add_argument("--no-perturb", action="store_true",
                    help="export the raw weights=None init (see _perturb_params)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.readme_only:
        write_readme(out_dir)
        return 0

    if args.worker:
        name, exporter = args.worker.split(":")
        try:
            res = worker(name, exporter, out_dir, perturb=not args.no_perturb)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            res = {"model": name, "exporter": exporter, "ok": False,
                   "reason": f"{type(e).__name__}: {first}"[:300]}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    names = list(MODELS) + list(EXTRAS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in MODELS and n not in EXTRAS]
        if unknown:
            ap.error(f"unknown models: {unknown}")
        names = wanted
    exporters = ["ts", "dynamo"] if args.exporter == "both" else [args.exporter]

    results = []
    for name in names:
        for exporter in exporters:
            if name in EXTRAS and exporter not in EXTRAS[name][1]:
                continue
            print(f"=== {name} [{exporter}] ...", flush=True)
            r = run_one(name, exporter, out_dir, args.timeout, perturb=not args.no_perturb)
            results.append(r)
            if r["ok"]:
                print(f"    ok  nodes={r['nodes']} opset={r['opset']} skel={r['skeleton_kb']}KB "
                      f"full={r['full_mb']}MB diff={r['max_abs_diff']:.2e} (|ref|max {r['ref_max_abs']:.3g}) "
                      f"checker={r['checker']} mat_out_max={r['mat_out_max_abs']:.3g} "
                      f"t={r['total_s']}s {r.get('note', '')}", flush=True)
            else:
                print(f"    FAIL {r['reason']}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))

    print()
    print_summary(results)
    if not args.no_readme:
        write_readme(out_dir)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
