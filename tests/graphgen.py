"""A grammar of small random graphs of the ops onnxprune supports, as hypothesis strategies, and the one check
every drawn run must pass: a valid model (exact with respect to the zeroed original when nothing re-fits it), or
a clean error. Shared by tests/test_properties.py and tools/fuzz_graphs.py.

Image models (1-D or 2-D): a stem conv, then blocks (convs: plain, grouped, depthwise, strided, dilated, with or
without bias and kernel_shape; BatchNormalization, InstanceNormalization; activations; residual adds; concats;
splits; pools; squeeze-excite), then a head (a conv, GlobalAveragePool + Flatten + Gemm, Flatten or Reshape into
Gemm or MatMul). Token models (N, S, D): MatMul MLPs, LayerNormalization, attention blocks (q/k/v MatMuls, reshape to
heads, transpose, softmax, merge, output projection), residual adds, then a MatMul or ReduceMean + Gemm head.

Activations with f(0) != 0 (Sigmoid, HardSigmoid, Exp, Softplus, Clip with min > 0, Add of a scalar) turn a
removed channel into a constant: where a layer consumes it the analysis marks the group inexact (issue 10), and the
exactness check leaves inexact groups out like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.pipeline import prepare
from onnxprune.verify import check_valid, io_signature, run, zero_removed_channels

from builders import GraphBuilder
from exactness import feeds_at

CRITERIA = ("l1", "l2", "random", "bn", "activation", "apoz", "regression")
DATA_CRITERIA = ("activation", "apoz", "regression")
RECOVERY = ("none", "bias", "lsq")
ZERO_AT_ZERO_ACTS = ("Relu", "LeakyRelu", "Tanh", "Clip0", "Neg", "HardSwish")
NONZERO_AT_ZERO_ACTS = ("Sigmoid", "HardSigmoid", "Exp", "Softplus", "ClipPos", "AddScalar", "Cos")  # f(0) != 0
ACTS = ZERO_AT_ZERO_ACTS + NONZERO_AT_ZERO_ACTS


@dataclass
class Drawn:
    """A drawn model and what the grammar put in it."""

    model: onnx.ModelProto
    ops: list[str] = field(default_factory=list)


@dataclass
class State:
    """The tensor the next block reads: its name, channels (axis 1, or the last axis for tokens) and sizes."""

    name: str
    channels: int
    spatial: list[int]


# ---------------------------------------------------------------------------------------------- image blocks

def conv_nd(b: GraphBuilder, s: State, cout: int, k: int = 3, group: int = 1, stride: int = 1, dilation: int = 1,
            bias: bool = True, kernel_attr: bool = True) -> State:
    nd = len(s.spatial)
    w = b.weight(cout, s.channels // group, *([k] * nd))
    inputs = [s.name, w] + ([b.const((b.rng.standard_normal(cout) * 0.1).astype(np.float32))] if bias else [])
    pad = dilation * (k - 1) // 2
    attrs = dict(pads=[pad] * (2 * nd), group=group, strides=[stride] * nd, dilations=[dilation] * nd)
    if kernel_attr:
        attrs["kernel_shape"] = [k] * nd
    y = b.op("Conv", inputs, **attrs)
    return State(y, cout, [(d + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for d in s.spatial])


@st.composite
def conv_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "strided", "dilated", "pointwise"]))
    cout = draw(st.sampled_from([4, 6, 8, 12, 16]))
    kw = dict(bias=draw(st.booleans()), kernel_attr=draw(st.booleans()))
    if kind == "grouped" and s.channels % 2 == 0:
        g = draw(st.sampled_from([g for g in (2, 3, 4) if s.channels % g == 0]))
        return conv_nd(b, s, g * draw(st.integers(1, 4)), group=g, **kw)
    if kind == "depthwise":
        return conv_nd(b, s, s.channels * draw(st.sampled_from([1, 2])), group=s.channels, **kw)
    if kind == "strided" and min(s.spatial) >= 4:
        return conv_nd(b, s, cout, stride=2, **kw)
    if kind == "dilated" and min(s.spatial) >= 5:
        return conv_nd(b, s, cout, dilation=2, **kw)
    return conv_nd(b, s, cout, k=1 if kind == "pointwise" else 3, **kw)


def activation(b: GraphBuilder, x: str, act: str, channels_axis: int = 1) -> str:
    if act == "Clip0":
        return b.op("Clip", [x, b.const(np.array(0, np.float32)), b.const(np.array(6, np.float32))])
    if act == "ClipPos":
        return b.op("Clip", [x, b.const(np.array(0.5, np.float32)), b.const(np.array(6, np.float32))])
    if act == "AddScalar":
        return b.op("Add", [x, b.const(np.array(0.25, np.float32))])
    if act == "LeakyRelu":
        return b.op("LeakyRelu", [x], alpha=0.1)
    return b.op(act, [x])


@st.composite
def act_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    act = draw(st.sampled_from(ACTS))
    d.ops.append(act)
    return State(activation(b, s.name, act), s.channels, s.spatial)


@st.composite
def norm_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    if draw(st.booleans()):
        return State(b.bn(s.name, s.channels), s.channels, s.spatial)
    scale = b.const(b.rng.uniform(0.5, 1.5, s.channels).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.1, s.channels).astype(np.float32))
    d.ops.append("InstanceNormalization")
    return State(b.op("InstanceNormalization", [s.name, scale, shift]), s.channels, s.spatial)


@st.composite
def residual_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    mid = conv_nd(b, s, draw(st.sampled_from([4, 8, 12])), k=draw(st.sampled_from([1, 3])))
    mid = State(b.op("Relu", [mid.name]), mid.channels, mid.spatial)
    y = conv_nd(b, mid, s.channels, k=1)
    if draw(st.booleans()):
        y = State(b.bn(y.name, y.channels), y.channels, y.spatial)
    return State(b.op("Add", [s.name, y.name]), s.channels, s.spatial)


@st.composite
def concat_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    left = conv_nd(b, s, draw(st.sampled_from([4, 6, 8])))
    right = conv_nd(b, s, draw(st.sampled_from([2, 4, 8])), k=1)
    parts = [left, right] + ([s] if draw(st.booleans()) else [])
    y = b.op("Concat", [p.name for p in parts], axis=1)
    return State(y, sum(p.channels for p in parts), s.spatial)


@st.composite
def split_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    a, c = draw(st.sampled_from([4, 8])), draw(st.sampled_from([2, 4, 6]))
    x = conv_nd(b, s, a + c, k=1)
    left, right = b.op("Split", [x.name, b.const(np.array([a, c], np.int64))], n_out=2, axis=1)
    if draw(st.booleans()):
        return State(b.op("Concat", [right, left], axis=1), a + c, x.spatial)
    cout = draw(st.sampled_from([4, 8]))
    ly, ry = conv_nd(b, State(left, a, x.spatial), cout), conv_nd(b, State(right, c, x.spatial), cout)
    return State(b.op("Add", [ly.name, ry.name]), cout, x.spatial)


@st.composite
def pool_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    if min(s.spatial) < 4:
        return s
    nd = len(s.spatial)
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    y = b.op(op, [s.name], kernel_shape=[2] * nd, strides=[2] * nd)
    return State(y, s.channels, [v // 2 for v in s.spatial])


@st.composite
def se_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    """Squeeze-excite: GlobalAveragePool, a bottleneck of two 1x1 convs, a sigmoid gate multiplied in."""
    g = State(b.op("GlobalAveragePool", [s.name]), s.channels, [1] * len(s.spatial))
    g = conv_nd(b, g, draw(st.sampled_from([2, 4])), k=1)
    g = conv_nd(b, State(b.op("Relu", [g.name]), g.channels, g.spatial), s.channels, k=1)
    gate = b.op(draw(st.sampled_from(["Sigmoid", "HardSigmoid"])), [g.name])
    d.ops.append("SE")
    return State(b.op("Mul", [s.name, gate]), s.channels, s.spatial)


@st.composite
def channel_op_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    """A per-channel constant operand: Mul, Div, PRelu slope, Add (a per-channel Add is zeroed with the channel)."""
    op = draw(st.sampled_from(["Mul", "Div", "PRelu", "Add", "Sub"]))
    shape = [s.channels] + [1] * len(s.spatial)
    c = b.const(b.rng.uniform(0.5, 1.5, shape).astype(np.float32))
    d.ops.append(op)
    return State(b.op(op, [s.name, c]), s.channels, s.spatial)


@st.composite
def transpose_conv_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    cout, stride, group = draw(st.sampled_from([4, 8])), draw(st.sampled_from([1, 2])), 1
    if s.channels % 2 == 0 and draw(st.booleans()):
        group = 2
    nd = len(s.spatial)
    w = b.weight(s.channels, cout // group, *([3] * nd))
    bias = [b.const(np.zeros(cout, np.float32) + 0.1)] if group == 1 and draw(st.booleans()) else []
    y = b.op("ConvTranspose", [s.name, w] + bias, kernel_shape=[3] * nd, strides=[stride] * nd, pads=[1] * (2 * nd),
             output_padding=[stride - 1] * nd, group=group)
    return State(y, cout, [v * stride for v in s.spatial])


@st.composite
def reshape_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    """Shape-only ops that keep the channel axis: Pad, a spatial Slice, Resize, a channel Slice, NHWC and back."""
    kind = draw(st.sampled_from(["pad", "slice", "resize", "channel_slice", "transpose"]))
    nd = len(s.spatial)
    d.ops.append(kind)
    if kind == "pad":
        pads = b.const(np.array([0, 0] + [1] * nd + [0, 0] + [1] * nd, np.int64))
        return State(b.op("Pad", [s.name, pads]), s.channels, [v + 2 for v in s.spatial])
    if kind == "slice" and min(s.spatial) >= 3:
        axes = b.const(np.array([2], np.int64))
        y = b.op("Slice", [s.name, b.const(np.array([1], np.int64)), b.const(np.array([-1], np.int64)), axes])
        return State(y, s.channels, [s.spatial[0] - 2] + s.spatial[1:])
    if kind == "resize":
        scales = b.const(np.array([1, 1] + [2] * nd, np.float32))
        return State(b.op("Resize", [s.name, "", scales], mode="nearest"), s.channels, [v * 2 for v in s.spatial])
    if kind == "channel_slice" and s.channels >= 4:
        stop = draw(st.integers(2, s.channels - 1))
        y = b.op("Slice", [s.name, b.const(np.array([0], np.int64)), b.const(np.array([stop], np.int64)),
                           b.const(np.array([1], np.int64))])
        return State(y, stop, s.spatial)
    perm = [0] + list(range(2, nd + 2)) + [1]
    back = [0, nd + 1] + list(range(1, nd + 1))
    return State(b.op("Transpose", [b.op("Transpose", [s.name], perm=perm)], perm=back), s.channels, s.spatial)


IMAGE_BLOCKS = [conv_block, act_block, norm_block, residual_block, concat_block, split_block, pool_block, se_block,
                channel_op_block, transpose_conv_block, reshape_block]


@st.composite
def image_head(draw, b: GraphBuilder, s: State, d: Drawn) -> str:
    head = draw(st.sampled_from(["conv", "gap_gemm", "flatten_gemm", "reshape_gemm", "flatten_matmul"]))
    d.ops.append(head)
    if head == "conv":
        return conv_nd(b, s, 3, k=1).name
    if head == "gap_gemm":
        x = b.op("Flatten", [b.op("GlobalAveragePool", [s.name])], axis=1)
        return b.gemm(x, s.channels, 5)
    features = s.channels * int(np.prod(s.spatial))
    if head == "reshape_gemm":
        x = b.op("Reshape", [s.name, b.const(np.array([0, -1], np.int64))])
        return b.gemm(x, features, 5, trans_b=draw(st.sampled_from([0, 1])))
    x = b.op("Flatten", [s.name], axis=1)
    return b.gemm(x, features, 5) if head == "flatten_gemm" else b.matmul(x, features, 5)


@st.composite
def image_models(draw) -> Drawn:
    d = Drawn(onnx.ModelProto())
    nd, size = draw(st.sampled_from([1, 2])), draw(st.sampled_from([4, 6, 8]))
    b = GraphBuilder(seed=draw(st.integers(0, 2**16)), opset=draw(st.sampled_from([13, 17])))
    s = State(b.input(["N", 3] + [size] * nd), 3, [size] * nd)
    s = conv_nd(b, s, draw(st.sampled_from([4, 8, 12, 16])))
    for block in draw(st.lists(st.sampled_from(IMAGE_BLOCKS), min_size=1, max_size=5)):
        d.ops.append(block.__name__)
        s = draw(block(b, s, d))
    d.ops.append(f"{nd}d")
    d.model = b.model(draw(image_head(b, s, d)))
    return d


# ---------------------------------------------------------------------------------------------- token blocks

@st.composite
def mlp_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    act = draw(st.sampled_from(ACTS))
    d.ops.append(act)
    hidden = draw(st.sampled_from([8, 12, 16, 24]))
    h = activation(b, b.matmul(s.name, s.channels, hidden, bias=draw(st.booleans())), act)
    y = b.matmul(h, hidden, s.channels)
    return State(b.op("Add", [s.name, y]) if draw(st.booleans()) else y, s.channels, s.spatial)


@st.composite
def layernorm_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    scale = b.const(b.rng.uniform(0.5, 1.5, s.channels).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.1, s.channels).astype(np.float32))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return State(b.op("LayerNormalization", [s.name, scale, shift], axis=-1, epsilon=eps), s.channels, s.spatial)


@st.composite
def attention_block(draw, b: GraphBuilder, s: State, d: Drawn) -> State:
    """q, k, v projections, split into heads, softmax(q k^T / sqrt(dh)) v, heads merged, output projection."""
    heads, dh = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 4]))
    e = heads * dh
    q, k, v = (b.matmul(s.name, s.channels, e, bias=draw(st.booleans())) for _ in range(3))
    shape = b.const(np.array([0, 0, heads, dh], np.int64))
    q, k, v = (b.op("Reshape", [t, shape]) for t in (q, k, v))
    q, v = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, v))
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const(np.array(1 / np.sqrt(dh), np.float32))])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    merged = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, e], np.int64))])
    y = b.matmul(merged, e, s.channels)
    return State(b.op("Add", [s.name, y]), s.channels, s.spatial)


TOKEN_BLOCKS = [mlp_block, layernorm_block, attention_block, act_block]


@st.composite
def token_models(draw) -> Drawn:
    d = Drawn(onnx.ModelProto())
    b = GraphBuilder(seed=draw(st.integers(0, 2**16)))
    width = draw(st.sampled_from([8, 12, 16]))
    s = State(b.matmul(b.input(["N", "S", 6]), 6, width), width, [])
    for block in draw(st.lists(st.sampled_from(TOKEN_BLOCKS), min_size=1, max_size=4)):
        d.ops.append(block.__name__)
        s = draw(block(b, s, d))
    if draw(st.booleans()):
        d.ops.append("reduce_gemm")
        pooled = b.op("ReduceMean", [s.name], axes=[1], keepdims=0)
        d.model = b.model(b.gemm(pooled, s.channels, 5))
    else:
        d.model = b.model(b.matmul(s.name, s.channels, 5))
    return d


def models() -> st.SearchStrategy[Drawn]:
    return st.one_of(image_models(), token_models())


# ---------------------------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One drawn prune run: the model, the target (a ratio, or a MAC fraction) and the options."""

    drawn: Drawn
    target: Target
    options: Options


def calibration_feeds(draw, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """A list of feed dicts: 1-3 batches of 1-4 samples, run-time lengths 1-4 (per batch)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = []
    for _ in range(draw(st.integers(1, 3))):
        batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        feeds.append({k: v * 2 for k, v in feeds_at(model, int(rng.integers(1 << 30)), batch, length).items()})
    return feeds


@st.composite
def options(draw, model: onnx.ModelProto, with_data: bool = False) -> Options:
    """Random options; calibration feeds when they are needed, or when `with_data` (a MAC target on a model with
    run-time sizes is counted at a calibration sample)."""
    criterion, recover = draw(st.sampled_from(CRITERIA)), draw(st.sampled_from(RECOVERY))
    allocation = draw(st.sampled_from(["uniform"] * 4 + ["global"] * 2 + ["sensitivity"]))
    calib = None
    if with_data or criterion in DATA_CRITERIA or recover != "none" or allocation == "sensitivity":
        calib = CalibrationSource(calibration_feeds(draw, model), batch_size=draw(st.sampled_from([1, 16])))
    return Options(criterion=criterion, recover=recover, calib=calib, allocation=allocation,
                   round_to=draw(st.sampled_from([1, 1, 2, 4, 8, 16])), seed=draw(st.integers(0, 100)),
                   schedule=draw(st.sampled_from(["oneshot"] * 7 + ["iterative"])), steps=draw(st.integers(1, 3)))


@st.composite
def runs(draw, model_strategy: st.SearchStrategy[Drawn] | None = None) -> Run:
    drawn = draw(models() if model_strategy is None else model_strategy)
    if draw(st.integers(0, 5)) == 0:
        target = Target.macs(draw(st.floats(0.2, 1.0)))
    else:
        target = Target.ratio(draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.9]), st.floats(0, 0.9))))
    return Run(drawn, target, draw(options(drawn.model, with_data=target.kind == "macs")))


def check_run(r: Run, errors: list[str] | None = None) -> str:
    """Prune as drawn; return 'error' for a clean error, 'valid' for a valid re-fitted model, 'exact' for a valid
    model equal to the zeroed original (inexact-marked groups left out); raise otherwise. A clean
    error's message is appended to `errors`."""
    try:
        pruned, report = onnxprune.prune(r.drawn.model, r.target, r.options)
    except onnxprune.OnnxPruneError as exc:
        if str(exc).startswith("internal error"):
            raise
        if errors is not None:
            errors.append(str(exc))
        return "error"
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(r.drawn.model)
    feeds = feeds_at(r.drawn.model, seed=3, batch=2, length=3)
    if all(np.isfinite(o).all() for o in run(r.drawn.model, feeds)):
        assert all(np.isfinite(o).all() for o in run(pruned, feeds)), "non-finite outputs from a finite model"
    if r.options.recover != "none":
        return "valid"
    exact(r.drawn.model, report.plan, feeds)
    return "exact"


def exact(model: onnx.ModelProto, plan, feeds: dict[str, np.ndarray]) -> None:
    """The plan (less its inexact-marked groups) applied through the public API to the original with the removed
    channels zeroed gives the zeroed original's outputs."""
    prepared = prepare(model)
    kept = type(plan)({g: k for g, k in plan.keep.items() if not prepared.analysis.groups[g].inexact})
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, kept)
    pruned, _ = onnxprune.prune(zeroed, Target.plan(kept), Options(round_to=1))
    for e, g in zip(run(zeroed, feeds), run(pruned, feeds)):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=1e-4 * max(1.0, float(np.abs(e).max())), rtol=1e-3)
