"""Packed sparse storage: every layer weight that packing makes smaller is stored as its kept values plus positions
(N:M) or a bitmask, rebuilt by standard ONNX nodes that onnxruntime folds at load; the packed model passes the full
checker and strict shape inference and gives bit-for-bit the outputs of the dense-sparse model."""
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

import onnxprune.graph
from onnxprune.graph import GraphIndex, load_model, save_model
from onnxprune.layers import describe
from onnxprune.sparsity.packed import (MASK_BITS, Rebuild, Tables, bitmask_encoding, combinations,
                                       codes_per_byte, nm_encoding, pack_codes, pack_model, unpack_table)
from onnxprune.sparsity.pattern import fold_constant_weights, pattern_holds
from onnxprune.sparsity.spec import Pattern
from onnxprune.verify import random_feeds, session


# ---------------------------------------------------------------------------------------------- models

def layer_net(kind: str) -> onnx.ModelProto:
    """Two layers of one kind, wide enough (a few KB) for packing to pay for its nodes: conv (3x3 then 1x1 kernels),
    gemm (transB 1 then 0), matmul (3-D input, a bias Add)."""
    b = GraphBuilder(seed=5)
    if kind == "conv":
        x = b.op("Relu", [b.conv(b.input(["N", 16, 6, 6]), 16, 32)])
        return b.model(b.conv(x, 32, 64, k=1))
    if kind == "gemm":
        x = b.op("Relu", [b.gemm(b.input(["N", 32]), 32, 64)])
        return b.model(b.gemm(x, 64, 48, trans_b=0))
    x = b.op("Relu", [b.matmul(b.input(["N", 5, 32]), 32, 64)])
    return b.model(b.matmul(x, 64, 48, bias=False))


def layer_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Weight name -> input-channel axis, for every layer (the layer descriptions say where the axis is)."""
    index = GraphIndex.build(model)
    layers = [describe(n, index) for n in model.graph.node]
    return {layer.weight: layer.in_axis % len(index.initializers[layer.weight].dims) for layer in layers if layer}


def sparsified(model: onnx.ModelProto, pattern: Pattern | None = None, ratio: float = 0.5,
               dtype=np.float32, negative_zeros: bool = False) -> onnx.ModelProto:
    """The model's layer weights with the smallest magnitudes zeroed (N:M along the input channels, or `ratio` of
    each weight), then every float tensor, input and output in `dtype`. `negative_zeros` zeroes by multiplying with
    the mask, which leaves -0.0 where a weight was negative."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    axes = layer_weights(model)
    for init in model.graph.initializer:
        weight = numpy_helper.to_array(init)
        if init.name in axes:
            keep = nm_mask(weight, axes[init.name], pattern) if pattern else np.abs(weight) > np.quantile(
                np.abs(weight), ratio)
            weight = weight * keep if negative_zeros else np.where(keep, weight, np.float32(0))
        init.CopyFrom(numpy_helper.from_array(weight.astype(dtype), init.name))
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = elem_type
    return model


def nm_mask(weight: np.ndarray, axis: int, pattern: Pattern) -> np.ndarray:
    """The n largest magnitudes of every m consecutive input channels."""
    moved = np.moveaxis(np.abs(weight), axis, -1)
    grouped = moved.reshape(moved.shape[:-1] + (-1, pattern.m))
    rank = np.argsort(np.argsort(-grouped, axis=-1, kind="stable"), axis=-1)
    return np.moveaxis((rank < pattern.n).reshape(moved.shape), -1, axis)


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[bytes]:
    return [o.tobytes() for o in session(model).run(None, feeds)]


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return {k: v.astype(dtype) for k, v in random_feeds(model, seed=2, batch=3).items()}


def assert_packed_exactly(dense: onnx.ModelProto, storage: str | None) -> onnx.ModelProto:
    """Pack `dense`: a valid model, every layer weight stored as `storage` (None: left dense), the rebuilt weights
    bit for bit the dense ones, the same output bytes in onnxruntime, and a smaller file where anything was packed."""
    packed, report = pack_model(dense)
    onnx.checker.check_model(packed, full_check=True)
    onnx.shape_inference.infer_shapes(packed, check_type=True, strict_mode=True)
    assert {w.storage for w in report.weights} == {storage or "dense"}, report.weights
    rebuilt = {i.name: numpy_helper.to_array(i) for i in fold_constant_weights(packed).graph.initializer}
    for init in dense.graph.initializer:
        assert rebuilt[init.name].dtype == numpy_helper.to_array(init).dtype
        assert rebuilt[init.name].tobytes() == numpy_helper.to_array(init).tobytes(), init.name
    feeds = feeds_for(dense)
    assert outputs(packed, feeds) == outputs(dense, feeds)
    size, dense_size = packed.ByteSize(), dense.ByteSize()
    assert size < dense_size if storage else size == dense_size
    assert report.stored_bytes < report.dense_bytes if storage else report.stored_bytes == report.dense_bytes
    return packed


# ---------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
@pytest.mark.parametrize("pattern, storage", [(Pattern(2, 4), "2:4"), (Pattern(1, 4), "1:4"),
                                              (Pattern(4, 8), "4:8")])
def test_nm_weights_round_trip_bit_exact(kind, pattern, storage, dtype):
    """2:4, 1:4 and 4:8 are stored as N:M: a block's combination code takes 8/3, 2 and 8 bits, fewer than or as
    many as a bitmask's M bits, and a bitmask also stores one zero."""
    dense = sparsified(layer_net(kind), pattern, dtype=dtype)
    assert all(pattern_holds(numpy_helper.to_array(i), axis, pattern)
               for i in dense.graph.initializer for name, axis in layer_weights(dense).items() if i.name == name)
    assert_packed_exactly(dense, storage)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8, 0.95])
def test_unstructured_weights_round_trip_bit_exact_as_bitmasks(kind, ratio, dtype):
    assert_packed_exactly(sparsified(layer_net(kind), ratio=ratio, dtype=dtype), "bitmask")


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_weights_with_too_few_zeros_stay_dense(kind):
    """A mask costs 1 bit per weight: with 2% zeros (under 1/32 of a float32's bits) packing saves nothing."""
    dense = sparsified(layer_net(kind), ratio=0.02)
    packed = assert_packed_exactly(dense, None)
    assert [n.op_type for n in packed.graph.node] == [n.op_type for n in dense.graph.node]


def test_negative_zeros_are_values_so_the_rebuild_stays_bit_exact():
    """w * mask leaves -0.0 where w < 0: a -0.0 is not the +0.0 a rebuild fills in, so it is stored as a value,
    and the 2:4 blocks no longer hold 2 stored values: the weights become bitmasks, still bit for bit."""
    dense = sparsified(layer_net("gemm"), Pattern(2, 4), negative_zeros=True)
    assert any(np.signbit(numpy_helper.to_array(i)[numpy_helper.to_array(i) == 0]).any()
               for i in dense.graph.initializer)
    assert_packed_exactly(dense, "bitmask")


def test_all_zero_weight_and_uneven_field_counts():
    """A weight of zeros only (its values are the fill zero alone) and a mask that does not fill its last byte."""
    b = GraphBuilder(seed=1)
    x = b.op("MatMul", [b.input(["N", 40]), b.const(np.zeros((40, 30), np.float32))])
    mask = np.arange(41 * 30).reshape(41, 30) % 5 == 0  # 41 input channels: no N:M; 1230 bits: 6 in the last byte
    y = b.op("MatMul", [b.input(["N", 41], name="y"), b.const(np.where(mask, 1.5, 0).astype(np.float32))])
    dense = b.model(b.op("Add", [x, y]))
    packed, report = pack_model(dense)
    assert [w.storage for w in report.weights] == ["bitmask", "bitmask"]
    feeds = {"x": np.ones((2, 40), np.float32), "y": np.ones((2, 41), np.float32)}
    assert outputs(packed, feeds) == outputs(dense, feeds)


def test_shared_weight_is_packed_once_for_every_reader():
    b = GraphBuilder(seed=2)
    w = b.const(np.where(np.arange(64)[:, None] % 2, np.full((64, 32), 0.5), 0).astype(np.float32))  # 1:2
    x = b.input(["N", 64])
    dense = b.model(b.op("Add", [b.op("MatMul", [x, w]), b.op("MatMul", [b.op("Neg", [x]), w])]))
    packed = assert_packed_exactly(dense, "1:2")
    assert [n.input[1] for n in packed.graph.node if n.op_type == "MatMul"] == [w, w]


def test_onnxruntime_folds_the_rebuild_at_session_creation(tmp_path):
    """The optimised graph onnxruntime runs holds none of the rebuild nodes: the weights are constants again, so
    inference costs what the dense model's does."""
    packed, _ = pack_model(sparsified(layer_net("conv"), Pattern(2, 4)))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(packed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node}
    assert ops == {"Conv", "Relu"}


def test_packed_2_4_float32_file_is_at_most_0_56_of_the_dense_file(tmp_path):
    b = GraphBuilder(seed=3)
    x = b.op("Relu", [b.conv(b.input(["N", 64, 8, 8]), 64, 64)])
    dense = sparsified(b.model(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), 64, 32)),
                       Pattern(2, 4))
    save_model(dense, tmp_path / "dense.onnx")
    save_model(pack_model(dense)[0], tmp_path / "packed.onnx")
    ratio = (tmp_path / "packed.onnx").stat().st_size / (tmp_path / "dense.onnx").stat().st_size
    assert ratio <= 0.56, ratio


def test_external_data_models_pack_and_save_with_external_data(tmp_path, monkeypatch):
    """A model whose weights live in an external file loads, packs, and saves with its packed tensors external
    (save_model's threshold lowered to 0 here), and runs the same."""
    dense = sparsified(layer_net("conv"), Pattern(2, 4))
    onnx.save_model(onnx.ModelProto.FromString(dense.SerializeToString()), tmp_path / "dense.onnx",
                    save_as_external_data=True, location="dense.onnx.data",
                    size_threshold=0)
    loaded = load_model(tmp_path / "dense.onnx")
    packed, report = pack_model(loaded)
    assert {w.storage for w in report.weights} == {"2:4"}
    monkeypatch.setattr(onnxprune.graph, "EXTERNAL_DATA_ABOVE", 0)
    save_model(packed, tmp_path / "packed.onnx")
    assert (tmp_path / "packed.onnx.data").is_file()
    again = onnx.load(tmp_path / "packed.onnx", load_external_data=False)
    assert any(i.data_location == TensorProto.EXTERNAL for i in again.graph.initializer)
    feeds = feeds_for(dense)
    assert outputs(load_model(tmp_path / "packed.onnx"), feeds) == outputs(dense, feeds)


def test_weights_not_packed_say_why():
    """An integer weight and a weight whose data was not loaded are left as they are, with the reason."""
    b = GraphBuilder()
    x = b.op("MatMul", [b.input(["N", 8], elem_type=TensorProto.INT32), b.const(np.eye(8, dtype=np.int32))])
    packed, report = pack_model(b.model(x))
    assert report.weights[0].storage == "dense" and "INT32" in report.weights[0].reason
    unloaded = sparsified(layer_net("gemm"), ratio=0.9)
    onnx.external_data_helper.set_external_data(unloaded.graph.initializer[0], "elsewhere.data")
    unloaded.graph.initializer[0].ClearField("raw_data")
    _, report = pack_model(unloaded)
    assert "not loaded" in next(w.reason for w in report.weights if w.weight == unloaded.graph.initializer[0].name)


# ---------------------------------------------------------------------------------------------- encodings

def rebuilt(encoding, name: str, weight: np.ndarray) -> np.ndarray:
    """What onnxruntime computes from an encoding's nodes, initializers and tables alone, at opset 11."""
    tables = encoding.tables
    graph = helper.make_graph([n for t in tables for n in t.nodes] + encoding.nodes, "rebuild", [],
                              [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(weight.dtype),
                                                             weight.shape)],
                              encoding.initializers + [i for t in tables for i in t.initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    onnx.checker.check_model(model, full_check=True)
    return session(model).run(None, {})[0]


def fresh(base: str) -> str:
    return f"{base}{next(COUNTER)}"


COUNTER = iter(range(10**9))


def rebuild(name: str = "w") -> Rebuild:
    return Rebuild(name, fresh, Tables(fresh))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("shape, axis", [((4, 3), 0), ((3, 8), 1), ((5, 12, 3, 3), 1), ((2, 16, 3), 1),
                                         ((7, 4, 2, 2, 2), 1), ((8, 5), 0)])
@pytest.mark.parametrize("n, m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (2, 16)])
def test_every_encoding_rebuilds_its_weight_bit_for_bit_at_opset_11(shape, axis, n, m, dtype):
    """N:M at every M that divides the channels (field counts that do not fill their last byte included) and the
    bitmask, in every float type, from ai.onnx opset 11 nodes alone."""
    rng = np.random.default_rng(n * 100 + m)
    weight = rng.standard_normal(shape).astype(dtype)
    if shape[axis] % m == 0:
        weight = np.where(nm_mask(weight, axis, Pattern(n, m)), weight, 0).astype(dtype)
        assert rebuilt(nm_encoding(weight, axis, n, m, rebuild()), "w", weight).tobytes() == weight.tobytes()
    weight[rng.random(shape) < 0.4] = 0
    weight.flat[0] = -0.0
    assert rebuilt(bitmask_encoding(weight, rebuild()), "w", weight).tobytes() == weight.tobytes()


# ---------------------------------------------------------------------------------------------- codes

@pytest.mark.parametrize("n, m, per", [(1, 2, 8), (1, 4, 4), (2, 4, 3), (3, 4, 4), (2, 8, 1), (4, 8, 1), (1, 16, 2),
                                       (2, 16, 1)])
def test_combination_codes_pack_as_many_to_a_byte_as_fit_and_unpack_by_table(n, m, per):
    """C(m, n) combinations, `per` to a byte (2:4: 6 of them, 3 to a byte); the table maps every byte back."""
    combos = combinations(n, m)
    assert len(combos) == math.comb(m, n) and codes_per_byte(len(combos)) == per
    indices = np.random.default_rng(m * n).integers(0, len(combos), 37)
    packed = pack_codes(indices, len(combos))
    assert packed.shape == (-(-37 // per),) and packed.dtype == np.uint8
    rows = unpack_table(combos)[packed].reshape(-1, n)[:37]
    np.testing.assert_array_equal(rows, combos[indices])


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (4, 8), (1, 16)])
def test_the_table_nodes_compute_the_table(n, m):
    used = set()

    def short_names(base: str) -> str:  # as a model's names come: the base, made unique
        while base in used:
            base += "_"
        used.add(base)
        return base
    table = Tables(short_names).get(combinations(n, m))
    graph = helper.make_graph(table.nodes, "table", [], [helper.make_tensor_value_info(table.name, TensorProto.INT32,
                                                                                       None)], table.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    np.testing.assert_array_equal(session(model).run(None, {})[0], unpack_table(combinations(n, m)))
    assert table.bytes < 800 + combinations(n, m).nbytes  # stored, the 2:4 table would take 1536 bytes


def test_bitmask_codes_are_numpy_packbits():
    bits = np.random.default_rng(0).integers(0, 2, 45)
    np.testing.assert_array_equal(pack_codes(bits, 2), np.packbits(bits))
    np.testing.assert_array_equal(unpack_table(MASK_BITS), np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], 1))
    assert codes_per_byte(257) == 0


def test_weights_with_the_same_codes_share_one_table():
    b = GraphBuilder(seed=4)
    x = b.op("Relu", [b.conv(b.input(["N", 16, 6, 6]), 16, 32)])
    dense = sparsified(b.model(b.conv(b.conv(x, 32, 64, k=1), 64, 16)), Pattern(2, 4))
    packed, report = pack_model(dense)
    assert [w.storage for w in report.weights] == ["2:4"] * 3
    assert sum(n.op_type == "Range" for n in packed.graph.node) == 1
    before = {i.name for i in dense.graph.initializer} | {n.name for n in dense.graph.node}
    added = sum(t.ByteSize() for t in list(packed.graph.initializer) + list(packed.graph.node) if t.name not in before)
    assert added == report.stored_bytes  # the table counted once
