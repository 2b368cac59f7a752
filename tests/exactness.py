"""The core invariants every pruned model must meet, as one helper the tests call."""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.api import make_plan, prepare
from onnxprune.surgery import apply_plan
from onnxprune.verify import check_valid, io_signature, random_feeds, run, zero_removed_channels


def prune_exact(model: onnx.ModelProto, ratio: float = 0.5, criterion: str = "l1", round_to: int = 1,
                atol: float = 1e-5, batch: int = 2, exclude: tuple[str, ...] = (), exact_groups_only: bool = False):
    """Zero the channels the plan removes in the original, prune that model with the same plan, and require the
    same onnxruntime outputs; also require a valid model with unchanged inputs and outputs.

    `exact_groups_only` leaves out groups marked inexact (a LayerNorm over the channels), whose removal changes the
    outputs by design. Returns (pruned model, analysis, plan)."""
    prepared = prepare(model, exclude)
    plan = make_plan(prepared.analysis, ratio, criterion, round_to)
    if exact_groups_only:
        plan.keep = {g: k for g, k in plan.keep.items() if not prepared.analysis.groups[g].inexact}
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, plan)
    again = prepare(zeroed, exclude)
    pruned = apply_plan(again.model, again.analysis, plan)
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(model)
    feeds = random_feeds(model, seed=1, batch=batch)
    expected, got = run(zeroed, feeds), run(pruned, feeds)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)
    return pruned, prepared.analysis, plan


def params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer))
