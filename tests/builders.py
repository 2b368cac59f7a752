"""Plain helpers the tests share: graphs built in code with onnx.helper (one small function per pattern, so a test
is a few lines), the repository's digits model and data, and CLI invocation and error checks. Test files import
from here (and from exactness.py), never from one another."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_cnn.calib.npz"
DIGITS_DATA = ROOT / "models" / "digits_cnn.test.npz"


def invoke(*args: object) -> Result:
    """Run the `onnxprune` command line in-process with these arguments (paths and numbers as text)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def files(folder: Path) -> set[str]:
    """The names in a folder: what a command wrote, or that it wrote nothing."""
    return {p.name for p in folder.iterdir()}


def one_line_error(result: Result, code: int, text: str) -> None:
    """Exactly one line on stderr, the error; whatever summary came before it went to stdout."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), result.stderr
    assert text in lines[0]
    assert "Traceback" not in result.output


class GraphBuilder:
    """Accumulates nodes and seeded random initializers; `model()` declares outputs from shape inference."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def input(self, shape, name: str = "x", elem_type=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def const(self, array, name: str | None = None) -> str:
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        std = scale if scale is not None else np.sqrt(2.0 / max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self._name(op_type)
        outs = [f"{name}_out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    # ------------------------------------------------------------------ layers
    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, stride: int = 1) -> str:
        inputs = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        return self.op("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x] + [self.const(p.astype(np.float32)) for p in params])

    def conv_bn_relu(self, x: str, cin: int, cout: int, **kw) -> str:
        return self.op("Relu", [self.bn(self.conv(x, cin, cout, **kw), cout)])

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1) -> str:
        w = self.weight(n, k) if trans_b else self.weight(k, n, scale=np.sqrt(2.0 / k))
        b = self.const((self.rng.standard_normal(n) * 0.1).astype(np.float32))
        return self.op("Gemm", [x, w, b], transB=trans_b)

    def matmul(self, x: str, k: int, n: int, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(k, n, scale=np.sqrt(2.0 / k))])
        if bias:
            y = self.op("Add", [y, self.const((self.rng.standard_normal(n) * 0.1).astype(np.float32))])
        return y

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
        return model


# ---------------------------------------------------------------------------------------------- the patterns

def conv_bn_relu_chain() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    x = b.conv_bn_relu(x, 16, 32)
    return b.model(b.conv(x, 32, 8))


def residual_block() -> onnx.ModelProto:
    b = GraphBuilder()
    stem = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    y = b.conv_bn_relu(stem, 16, 32)
    y = b.bn(b.conv(y, 32, 16), 16)
    out = b.op("Relu", [b.op("Add", [stem, y])])
    return b.model(b.conv(out, 16, 4))


def concat_branches() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input(["N", 3, 8, 8])
    left = b.conv_bn_relu(x, 3, 16)
    right = b.conv_bn_relu(x, 3, 8, k=1)
    cat = b.op("Concat", [left, right], axis=1)
    return b.model(b.conv(cat, 24, 4))


def depthwise_separable() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16, k=1)
    x = b.conv_bn_relu(x, 16, 16, group=16)
    return b.model(b.conv(x, 16, 8, k=1))


def squeeze_excite() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    s = b.op("GlobalAveragePool", [x])
    s = b.op("Relu", [b.conv(s, 16, 8, k=1)])
    s = b.op("HardSigmoid", [b.conv(s, 8, 16, k=1)])
    y = b.op("Mul", [x, s])
    return b.model(b.conv(y, 16, 4))


def flatten_gemm_head() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16, stride=2)  # 4x4 spatial
    f = b.op("Flatten", [x], axis=1)
    h = b.op("Relu", [b.gemm(f, 16 * 16, 32)])
    return b.model(b.gemm(h, 32, 10))


def matmul_mlp() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input(["N", 5, 16])
    h = b.op("Relu", [b.matmul(x, 16, 32)])
    h = b.op("Tanh", [b.matmul(h, 32, 24)])
    return b.model(b.matmul(h, 24, 16))


def grouped_conv() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 32, k=1)
    x = b.conv_bn_relu(x, 32, 32, group=8)
    return b.model(b.conv(x, 32, 8, k=1))


def split_branches() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 24)
    left, right = b.op("Split", [x, b.const(np.array([16, 8], np.int64))], n_out=2, axis=1)
    return b.model(b.op("Add", [b.conv(left, 16, 4), b.conv(right, 8, 4)]))


def token_mlp() -> onnx.ModelProto:
    """Tokens (N, S, 8) and an attention_mask (N, S): relu(x W1 + b1) W2, zeroed at padded positions."""
    b = GraphBuilder()
    x = b.input(["N", "S", 8])
    mask = b.input(["N", "S"], name="attention_mask", elem_type=onnx.TensorProto.INT64)
    h = b.op("Relu", [b.matmul(x, 8, 16)])
    keep = b.op("Unsqueeze", [b.op("Cast", [mask], to=onnx.TensorProto.FLOAT), b.const(np.array([2], np.int64))])
    return b.model(b.op("Mul", [b.matmul(h, 16, 4), keep]))


def padded_tokens(seed: int = 0) -> dict[str, np.ndarray]:
    """Sentences of 2 to 6 real tokens in 6 positions; the padding holds large garbage."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, 10)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    x = np.where(mask[..., None] == 1, rng.standard_normal((10, 6, 8)), 50.0).astype(np.float32)
    return {"x": x, "attention_mask": mask}
