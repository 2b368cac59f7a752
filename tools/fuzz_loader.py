"""A mutation fuzzer for the loader: truncated, bit-flipped, byte-spliced and field-mutated protobufs of real models
(models/digits_cnn.onnx and materialised zoo skeletons), fed to the command line in-process (click's CliRunner):
`onnxprune analyze M.onnx` and `onnxprune M.onnx --ratio 0.5 -o OUT`. Success, or exactly one line
`onnxprune: error: ...` with exit 1 or 2, is right; anything else (an "internal error", a traceback, another exit
code, more than 60 s) is a crash, printed with the mutation that made it and kept in --keep for reproduction.

    nice -n 10 python tools/fuzz_loader.py --minutes 10 [--seed S] [--keep DIR] [--zoo squeezenet1_1,mobilenet_v3_small]

Plain Python mutation with a seeded RNG: the same seed and budget give the same cases (in the same order).
"""
from __future__ import annotations

import argparse
import collections
import logging
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import onnx
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.cli import cli  # noqa: E402
from onnxprune.testing.skeleton import materialize  # noqa: E402

OPS = ["Conv", "Relu", "Add", "Gemm", "MatMul", "Reshape", "Concat", "Split", "Slice", "Flatten", "Transpose",
       "BatchNormalization", "GlobalAveragePool", "MaxPool", "Softmax", "Mul", "Identity", "Constant", "Loop", "If",
       "NoSuchOp", "Shape", "Gather", "Resize", "Pad", "ConvTranspose", "Squeeze", "Unsqueeze", "Einsum"]


def seeds(zoo: list[str]) -> dict[str, bytes]:
    found = {"digits_cnn": (ROOT / "models" / "digits_cnn.onnx").read_bytes()}
    for name in zoo:
        found[name] = materialize(onnx.load(str(ROOT / "models" / "zoo" / f"{name}.ts.onnx"))).SerializeToString()
    return found


# ---------------------------------------------------------------------------------------------- byte mutations

def truncate(rng: random.Random, data: bytes, model: onnx.ModelProto) -> tuple[bytes, str]:
    cut = rng.choice([rng.randrange(len(data)), rng.randrange(min(len(data), 4096)), len(data) - rng.randrange(1, 64)])
    return data[:max(cut, 0)], f"truncate at {cut}"


def flip_bits(rng: random.Random, data: bytes, model: onnx.ModelProto) -> tuple[bytes, str]:
    region, (start, end) = _region(rng, data, model)
    out = bytearray(data)
    flips = [rng.randrange(start, end) for _ in range(rng.randint(1, 8))]
    for at in flips:
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out), f"flip {len(flips)} bits in {region}"


def splice(rng: random.Random, data: bytes, model: onnx.ModelProto) -> tuple[bytes, str]:
    """Overwrite, insert or delete a few bytes inside a structural part (the length prefixes then disagree)."""
    region, (start, end) = _region(rng, data, model)
    at, n = rng.randrange(start, end), rng.randint(1, 8)
    kind = rng.choice(["overwrite", "insert", "delete"])
    junk = bytes(rng.randrange(256) for _ in range(n))
    if kind == "overwrite":
        return data[:at] + junk + data[at + n:], f"overwrite {n} bytes in {region}"
    if kind == "insert":
        return data[:at] + junk + data[at:], f"insert {n} bytes in {region}"
    return data[:at] + data[at + n:], f"delete {n} bytes in {region}"


def _region(rng: random.Random, data: bytes, model: onnx.ModelProto) -> tuple[str, tuple[int, int]]:
    """Where to mutate: anywhere (mostly weights), or inside one node, input, output or opset import, found by its
    serialised bytes (serialisation is deterministic, so a part's bytes appear verbatim in the file)."""
    g = model.graph
    parts = [("node", list(g.node)), ("input", list(g.input)), ("output", list(g.output)),
             ("opset", list(model.opset_import)), ("small initializer", [i for i in g.initializer if i.ByteSize() < 256])]
    kind, items = rng.choice([p for p in parts if p[1]] + [("anywhere", [])])
    if kind != "anywhere":
        raw = rng.choice(items).SerializeToString()
        at = data.find(raw)
        if at >= 0 and raw:
            return kind, (at, at + len(raw))
    return "anywhere", (0, len(data))


# ---------------------------------------------------------------------------------------------- field mutations

def mutate_field(rng: random.Random, data: bytes, model: onnx.ModelProto) -> tuple[bytes, str]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    what = rng.choice([_node_field, _node_field, _tensor_field, _value_info_field, _model_field])(rng, m)
    return m.SerializeToString(), what


def _node_field(rng: random.Random, m: onnx.ModelProto) -> str:
    nodes = m.graph.node
    i = rng.randrange(len(nodes))
    node = nodes[i]
    kind = rng.choice(["op_type", "drop input", "add input", "rename output", "attribute", "drop attribute",
                       "duplicate", "delete", "swap", "domain"])
    if kind == "op_type":
        node.op_type = rng.choice(OPS)
    elif kind == "drop input" and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif kind == "add input":
        node.input.append(rng.choice(["", "nowhere", *[n for n in node.input]]))
    elif kind == "rename output" and node.output:
        node.output[rng.randrange(len(node.output))] = rng.choice(["", "y", nodes[rng.randrange(len(nodes))].output[0]])
    elif kind == "attribute" and node.attribute:
        _attribute(rng, node.attribute[rng.randrange(len(node.attribute))])
    elif kind == "drop attribute" and node.attribute:
        del node.attribute[rng.randrange(len(node.attribute))]
    elif kind == "duplicate":
        nodes.insert(rng.randrange(len(nodes) + 1), node)
    elif kind == "delete" and len(nodes) > 1:
        del nodes[i]
    elif kind == "swap":
        j = rng.randrange(len(nodes))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(nodes[i]), b.CopyFrom(nodes[j])
        nodes[i].CopyFrom(b), nodes[j].CopyFrom(a)
    elif kind == "domain":
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "bogus"])
    return f"node {i} ({node.op_type}): {kind}"


def _attribute(rng: random.Random, attr: onnx.AttributeProto) -> None:
    values = [0, -1, 1, 2, 3, -7, 2**31, 2**62, 1000]
    if attr.ints:
        attr.ints[rng.randrange(len(attr.ints))] = rng.choice(values)
        if rng.random() < 0.3:
            attr.ints.append(rng.choice(values))
    elif attr.type == onnx.AttributeProto.INT:
        attr.i = rng.choice(values)
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf")])
    else:
        attr.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRING])


def _tensor_field(rng: random.Random, m: onnx.ModelProto) -> str:
    inits = m.graph.initializer
    t = inits[rng.randrange(len(inits))]
    kind = rng.choice(["dims", "add dim", "drop dim", "data_type", "truncate data", "external", "rename", "delete"])
    if kind == "dims" and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, -1, 3, 2**40, t.dims[0] + 1])
    elif kind == "add dim":
        t.dims.append(rng.choice([1, 2]))
    elif kind == "drop dim" and t.dims:
        del t.dims[-1]
    elif kind == "data_type":
        t.data_type = rng.choice([0, 2, 6, 7, 10, 11, 16, 8, 99])
    elif kind == "truncate data" and t.raw_data:
        t.raw_data = t.raw_data[:rng.randrange(len(t.raw_data))]
    elif kind == "external":
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=rng.choice(["missing.bin", "", "sub/missing.data"]))
    elif kind == "rename":
        t.name = rng.choice(["", "x", inits[0].name])
    elif kind == "delete":
        del inits[rng.randrange(len(inits))]
    return f"initializer {t.name[:40]!r}: {kind}"


def _value_info_field(rng: random.Random, m: onnx.ModelProto) -> str:
    g = m.graph
    fields = [f for f in (g.input, g.output, g.value_info) if len(f)]
    values = rng.choice(fields)
    vi = values[rng.randrange(len(values))]
    kind = rng.choice(["elem_type", "dim", "drop shape", "add dim", "rename", "delete", "duplicate"])
    tt = vi.type.tensor_type
    if kind == "elem_type":
        tt.elem_type = rng.choice([0, 2, 6, 7, 9, 10, 11, 16, 8, 99])
    elif kind == "dim" and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if rng.random() < 0.5:
            d.dim_value = rng.choice([0, 1, 2, 7, -3, 2**40])
        else:
            d.dim_param = rng.choice(["N", "", "S"])
    elif kind == "drop shape":
        tt.ClearField("shape")
    elif kind == "add dim":
        tt.shape.dim.add().dim_value = rng.choice([1, 3])
    elif kind == "rename":
        vi.name = rng.choice(["", "renamed", g.node[0].output[0]])
    elif kind == "delete":
        del values[rng.randrange(len(values))]
    elif kind == "duplicate":
        values.append(vi)
    return f"value info {vi.name[:40]!r}: {kind}"


def _model_field(rng: random.Random, m: onnx.ModelProto) -> str:
    kind = rng.choice(["ir_version", "opset", "opset domain", "drop opsets", "extra opset", "graph name"])
    if kind == "ir_version":
        m.ir_version = rng.choice([0, 1, 3, 7, 10, 11, 99, 2**40])
    elif kind == "opset":
        m.opset_import[0].version = rng.choice([0, 1, 10, 11, 12, 21, 22, 99, 2**40])
    elif kind == "opset domain":
        m.opset_import[0].domain = rng.choice(["ai.onnx", "bogus", "com.microsoft"])
    elif kind == "drop opsets":
        m.ClearField("opset_import")
    elif kind == "extra opset":
        m.opset_import.add(domain=rng.choice(["", "com.microsoft"]), version=rng.choice([1, 13, 99]))
    else:
        m.graph.name = ""
    return f"model: {kind}"


MUTATIONS = [truncate, flip_bits, flip_bits, splice, mutate_field, mutate_field, mutate_field]


# ---------------------------------------------------------------------------------------------- runs

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def outcome(args: list[str]) -> tuple[str, str]:
    """('ok' | 'clean' | 'crash', detail) for one in-process CLI run."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        result = CliRunner().invoke(cli, args)
    except Hang:
        return "crash", "no answer in 60 s"
    finally:
        signal.alarm(0)
    errors = [line for line in result.stderr.splitlines() if line.startswith("onnxprune: error:")]
    if result.exit_code == 0:
        return "ok", ""
    if result.exit_code in (1, 2) and len(errors) == 1 and "internal error" not in errors[0] \
            and "Traceback" not in result.output:
        return "clean", errors[0]
    return "crash", (errors or [repr(result.exception)])[0] + f" (exit {result.exit_code})"


def fuzz(minutes: float, seed: int, keep: Path | None, zoo: list[str]) -> None:
    rng, originals = random.Random(seed), seeds(zoo)
    parsed = {name: onnx.load_from_string(data) for name, data in originals.items()}
    counts, errors, crashes = collections.Counter(), collections.Counter(), collections.Counter()
    deadline = time.monotonic() + minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < deadline:
            name = rng.choice(list(originals))
            data, what = rng.choice(MUTATIONS)(rng, originals[name], parsed[name])
            path = Path(tmp) / "m.onnx"
            path.write_bytes(data)
            counts["cases"] += 1
            for command in (["analyze", str(path)], [str(path), "--ratio", "0.5", "-o", str(Path(tmp) / "out.onnx")]):
                kind, detail = outcome(command)
                counts[f"{command[0] if command[0] == 'analyze' else 'prune'} {kind}"] += 1
                if kind == "clean":
                    errors[re.sub(r"\d+", "#", detail)[:120]] += 1
                elif kind == "crash":
                    _crash(crashes, keep, data, name, what, command[0], detail)
    _summary(counts, errors, crashes, minutes, seed)


def _crash(crashes: collections.Counter, keep: Path | None, data: bytes, name: str, what: str, command: str,
           detail: str) -> None:
    key = re.sub(r"'[^']*'|\d+", "#", detail)[:160]
    crashes[key] += 1
    if crashes[key] == 1:
        print(f"CRASH {name}: {what} -> {command}: {detail}", flush=True)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"crash{len(crashes)}.onnx").write_bytes(data)


def _summary(counts, errors, crashes, minutes: float, seed: int) -> None:
    print(f"{minutes:g} min, seed {seed}: {counts['cases']} mutated models; " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "cases"))
    print(f"crashes: {sum(crashes.values())} ({len(crashes)} distinct)")
    for message, n in errors.most_common(12):
        print(f"  clean x{n}: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--zoo", default="squeezenet1_1,mobilenet_v3_small")
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    fuzz(args.minutes, args.seed, args.keep, [z for z in args.zoo.split(",") if z])


if __name__ == "__main__":
    main()
