"""Every model of the exported zoo (models/zoo: torchvision through both PyTorch exporters, stored as weight-free
skeletons and materialised with seeded random weights) prunes to a valid, exact, smaller graph."""
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


def marks(path: Path):
    return [pytest.mark.slow] if path.name.split(".")[0] in BIG else []


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=marks(p)) for p in ZOO])
def test_zoo_model_prunes_valid_exact_and_smaller(path):
    model = materialize(onnx.load(path))
    pruned, report = onnxprune.prune(model, 0.5, Options(criterion="l1"))
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(model)
    assert all(out.size for out in run(pruned, random_feeds(model)))
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    prune_exact(model, ratio=0.5, atol=1e-3, batch=1, exact_groups_only=True)
