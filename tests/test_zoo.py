"""Every model of the exported zoo (models/zoo, stored as weight-free skeletons and materialised with seeded random
weights) prunes to a valid, exact, smaller graph: torchvision through both PyTorch exporters (tools/export_zoo.py),
and the exports of other frameworks and the models PyPI wheels ship (tools/export_frameworks.py, issue 10)."""
import json
from pathlib import Path

import onnx
import pytest
from exactness import prune_exact

import onnxprune
from onnxprune import Options
from onnxprune.testing.skeleton import materialize
from onnxprune.verify import check_valid, io_signature, random_feeds, run

ZOO = sorted((Path(__file__).resolve().parent.parent / "models" / "zoo").glob("*.onnx"))
# Several hundred MB of weights once materialised: pruned in CI all the same, only marked for selection.
BIG = ("vgg11_bn", "alexnet", "wide_resnet50_2", "vit_b_16")
EXAMPLE_SHAPES_KEY = "onnxprune.example_shapes"


def marks(path: Path):
    return [pytest.mark.slow] if path.name.split(".")[0] in BIG else []


def zoo_model(path: Path) -> onnx.ModelProto:
    """The skeleton at `path` materialised with seeded random weights. A model that ships with run-time input sizes
    (a wheel's OCR or VAD model) gets the example sizes its skeleton records fixed on its inputs, so that its MACs
    are counted and the test inputs have the sizes the model is made for (length 1 breaks an OCR recogniser). A
    dimension of -1 (Paddle's "any", which its outputs declare too) is left as it is."""
    model = materialize(onnx.load(path))
    meta = {p.key: p.value for p in model.metadata_props}
    shapes = json.loads(meta.get(EXAMPLE_SHAPES_KEY, "{}"))
    for vi in model.graph.input:
        for dim, size in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, [])):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                continue
            dim.Clear()
            dim.dim_value = size
    return model


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=marks(p)) for p in ZOO])
def test_zoo_model_prunes_valid_exact_and_smaller(path):
    model = zoo_model(path)
    pruned, report = onnxprune.prune(model, 0.5, Options(criterion="l1"))
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(model)
    assert all(out.size for out in run(pruned, random_feeds(model)))
    # smaller: fewer parameters and never more MACs (silero's 16k op15 model loses parameters but no counted MAC)
    assert report.macs_after <= report.macs_before and report.params_after < report.params_before
    prune_exact(model, ratio=0.5, atol=1e-3, batch=1, exact_groups_only=True)


def test_example_shapes_are_fixed_on_the_inputs_they_name(tmp_path):
    """A wheel model's run-time dimensions take the recorded example sizes, but for Paddle's -1; inputs the record
    leaves out keep theirs."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 3, "?", "?"])
    s = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, ["n"])
    t = onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["n"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"]),
                                    onnx.helper.make_node("Relu", ["s"], ["t"])], "g", [x, s], [y, t])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {EXAMPLE_SHAPES_KEY: json.dumps({"x": [1, 3, 48, 96]})})
    onnx.save(model, tmp_path / "m.onnx")
    fixed = zoo_model(tmp_path / "m.onnx")
    dims = [[d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in fixed.graph.input]
    assert dims == [[-1, 3, 48, 96], ["n"]]
