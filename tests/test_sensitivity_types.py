"""Group types for the sensitivity report (issue 14): where each group sits in a detector-like graph built in code
(backbone, an FPN neck with Resize, a DB head with ConvTranspose), read from the graph and not from names, and the
damage per type that `onnxprune sensitivity --types` prints."""
import json

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, conv_bn_relu_chain, invoke, one_line_error
from onnxprune import CalibrationSource, Options, Target
from onnxprune.group_types import GROUP_TYPES, place_groups


def detector() -> tuple[onnx.ModelProto, dict[str, str]]:
    """A DBNet in miniature: a stride-8 backbone, lateral 1x1 convs summed top-down through a Resize, output convs
    (one with a squeeze-and-excitation branch), the levels concatenated at stride 4, and a head of a conv and two
    ConvTranspose to a probability map at the input's size. Also: the type expected of the group each named conv
    produces."""
    b = GraphBuilder(seed=1)
    scale2 = b.const(np.array([1, 1, 2, 2], np.float32))
    stem = b.conv_bn_relu(b.input(["N", 3, 32, 32]), 3, 8, stride=2)
    c2 = b.conv_bn_relu(stem, 8, 16, stride=2)  # 8 x 8
    c3 = b.conv_bn_relu(c2, 16, 32, stride=2)  # 4 x 4
    lat3, lat2 = b.conv(c3, 32, 16, k=1), b.conv(c2, 16, 16, k=1)
    top_down = b.op("Add", [lat2, b.op("Resize", [lat3, "", scale2], mode="nearest")])
    p3 = b.op("Resize", [b.conv_bn_relu(lat3, 16, 8), "", scale2], mode="nearest")
    p2 = b.conv_bn_relu(top_down, 16, 8)
    squeeze = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [p2]), 8, 4, k=1)])
    p2 = b.op("Mul", [p2, b.op("HardSigmoid", [b.conv(squeeze, 4, 8, k=1)])])
    fused = b.op("Concat", [p2, p3], axis=1)
    head = b.conv_bn_relu(fused, 16, 8)
    up = b.op("Relu", [b.op("ConvTranspose", [head, b.weight(8, 4, 2, 2), b.const(np.zeros(4, np.float32))],
                            kernel_shape=[2, 2], strides=[2, 2])])
    prob = b.op("Sigmoid", [b.op("ConvTranspose", [up, b.weight(4, 1, 2, 2)], kernel_shape=[2, 2], strides=[2, 2])])
    model = b.model(prob)
    producers = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    expected = {"stem": "backbone", "c2": "backbone", "c3": "backbone", "lat": "upsample", "p3": "upsample",
                "p2": "neck", "squeeze": "neck", "head": "head", "up": "head"}
    weights = {"stem": stem, "c2": c2, "c3": c3, "lat": lat3, "p3": p3, "p2": p2, "squeeze": squeeze, "head": head,
               "up": up}
    return model, {_producing_weight(model, producers, tensor): expected[key] for key, tensor in weights.items()}


def _producing_weight(model: onnx.ModelProto, producers: dict[str, str], tensor: str) -> str:
    """The weight of the layer whose output reaches `tensor` through single-input nodes (BN, Relu, Resize, Mul)."""
    by_output = {n.output[0]: n for n in model.graph.node}
    while tensor not in producers:
        tensor = by_output[tensor].input[0]
    return producers[tensor]


def kinds_by_weight(model: onnx.ModelProto) -> dict[str, str]:
    analysis = onnxprune.analyze(model)
    placements = place_groups(analysis, analysis.index.shapes)
    found = {}
    for group in analysis.prunable:
        for member in group.members:
            if member.constant and member.role == "w_out":
                found[member.space[0]] = placements[group.id].kind
    return found


def test_detector_groups_are_placed_by_the_graph():
    model, expected = detector()
    found = kinds_by_weight(model)
    assert {w: found.get(w) for w in expected} == expected


def test_placement_ignores_names():
    """Every node and tensor renamed (the types are read from ops and shapes, not from what a model calls them)."""
    model, expected = detector()
    renamed, names = _renamed(model)
    found = kinds_by_weight(renamed)
    assert {w: found.get(names[w]) for w in expected} == expected


def _renamed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    graph, names = renamed.graph, {}
    values = [*(i.name for i in graph.initializer), *(o for n in graph.node for o in n.output)]
    for k, name in enumerate(values):
        names[name] = f"t{(k * 7919) % 1000:03d}_{k}"
    for init in graph.initializer:
        init.name = names[init.name]
    for k, node in enumerate(graph.node):
        node.name = f"n{k}"
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names[o] for o in node.output]
    for output in graph.output:
        output.name = names[output.name]
    return renamed, names


def test_a_classifier_has_no_neck_and_no_upsampling():
    found = set(kinds_by_weight(conv_bn_relu_chain()).values())
    assert found <= {"backbone", "head"} and "head" in found


def test_damage_per_type():
    model, _ = detector()
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    calib = CalibrationSource([{"x": images[:4]}, {"x": images[4:]}])
    report = onnxprune.sensitivity(model, Options(round_to=1, calib=calib), by_type=True)
    rows = {row["type"]: row for row in report["types"]}
    assert set(rows) == set(GROUP_TYPES)
    assert sum(row["groups"] for row in rows.values()) == len(report["groups"])
    for row in rows.values():
        assert [p["ratio"] for p in row["points"]] == [0.25, 0.5, 0.75]
        assert all(p["damage"] > 0 and 0 < p["macs_saved"] < report["macs"] for p in row["points"])
        assert row["points"][-1]["macs_saved"] > row["points"][0]["macs_saved"]


def test_cli_types(tmp_path):
    model, _ = detector()
    onnx.save(model, tmp_path / "det.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    result = invoke("sensitivity", tmp_path / "det.onnx", "--calib", tmp_path / "calib.npz", "--types",
                    "--round-to", 1, "--json", tmp_path / "types.json")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("head ") for line in lines) and any(line.startswith("upsample ") for line in lines)
    assert {row["type"] for row in json.loads((tmp_path / "types.json").read_text())["types"]} == set(GROUP_TYPES)
    result = invoke("sensitivity", tmp_path / "det.onnx", "--calib", tmp_path / "calib.npz", "--types",
                    "--plot", tmp_path / "x.png")
    one_line_error(result, 2, "--types")


@pytest.mark.parametrize("ratio", [0.5])
def test_detector_prunes_exactly(ratio):
    """The graph the types are tested on is itself pruned exactly (Resize, ConvTranspose and the SE branch)."""
    from exactness import prune_exact
    model, _ = detector()
    prune_exact(model, ratio)


def test_protect_head_leaves_the_head_whole_and_meets_the_target():
    model, expected = detector()
    head = {g.id for g in onnxprune.analyze(model).prunable for m in g.members
            if m.role == "w_out" and expected.get(m.space[0]) == "head"}
    _, report = onnxprune.prune(model, Target.macs(0.6), Options(round_to=1, protect=("head",)))
    groups = {g["id"]: g for g in report.to_dict()["groups"]}
    assert len(head) == 2
    assert all(groups[gid]["frozen"] == ["protected: a head group (--protect head)"] for gid in head)
    assert report.target["met"] and any(g["kept"] < g["channels"] for g in groups.values())
    _, unprotected = onnxprune.prune(model, Target.macs(0.6), Options(round_to=1))
    assert all(g["prunable"] for g in unprotected.to_dict()["groups"] if g["id"] in head)


def test_protect_refuses_an_unknown_type(tmp_path):
    with pytest.raises(onnxprune.UsageError, match="--protect takes group types"):
        onnxprune.prune(detector()[0], 0.5, Options(protect=("tail",)))
    model, _ = detector()
    onnx.save(model, tmp_path / "det.onnx")
    result = invoke(tmp_path / "det.onnx", "--ratio", 0.5, "--protect", "head", "--round-to", 1, "--report",
                    tmp_path / "r.json", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    reasons = [r["reason"] for r in json.loads((tmp_path / "r.json").read_text())["frozen_reasons"]]
    assert "protected: a head group (--protect head)" in reasons


def test_a_tiled_conv_transpose_is_cut_into_conv_rows():
    """kernel == strides: each output position is its tap's weights times one input position, so the rows and the
    weight's rows reproduce the outputs (what least squares fits); overlapping kernels are still not refitted."""
    from onnx import helper, numpy_helper

    from onnxprune.graph import GraphIndex
    from onnxprune.layers import describe
    from onnxprune.verify import session
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((4, 3, 2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    for strides, refittable in (([2, 3], True), ([1, 1], False)):
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[2, 3], strides=strides)
        graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", 1, [2, 4, 5, 6])],
                                  [helper.make_tensor_value_info("y", 1, None)],
                                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        layer = describe(model.graph.node[0], GraphIndex.build(model))
        assert layer.refittable == refittable
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    sample = layer_of_tiles(w, bias).sample(x, rng, 40)
    y = session(tiles_model(w, bias)).run(None, {"x": x})[0]
    predicted = sample.patches.reshape(len(sample.patches), -1) @ layer_of_tiles(w, bias).weight_rows(w) + bias
    assert np.abs(predicted - layer_of_tiles(w, bias).output_rows(y, sample)).max() < 1e-4


def tiles_model(w: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    from onnx import helper, numpy_helper
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=list(w.shape[2:]),
                            strides=list(w.shape[2:]))
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", 1, [2, w.shape[0], 5, 6])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_of_tiles(w: np.ndarray, bias: np.ndarray):
    from onnxprune.graph import GraphIndex
    from onnxprune.layers import describe
    model = tiles_model(w, bias)
    return describe(model.graph.node[0], GraphIndex.build(model))


def test_lsq_recovers_a_pruned_head_through_conv_transpose():
    """Only the head's groups pruned (the others protected): least squares now re-fits the two ConvTranspose layers
    that read them (it left them as they were), and brings the probability map on held-out inputs closer."""
    from onnxprune.sensitivity import model_outputs, output_damage
    model, _ = detector()
    images = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    calib, held_out = [{"x": images[:12]}], [{"x": images[12:]}]
    reference = model_outputs(model, held_out)
    damage, refitted = {}, {}
    for recover in ("none", "lsq"):
        options = Options(round_to=1, recover=recover, protect=("backbone", "upsample", "neck"),
                          calib=CalibrationSource(calib))
        pruned, report = onnxprune.prune(model, 0.5, options)
        damage[recover] = output_damage(reference, model_outputs(pruned, held_out))
        refitted[recover] = report.recovered_layers
    assert refitted == {"none": 0, "lsq": 2}
    assert damage["lsq"] < damage["none"], damage
