"""The core invariants every pruned model must meet, as one helper the tests call."""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune import Options, Target
from onnxprune.allocate import Plan
from onnxprune.groups import Analysis
from onnxprune.pipeline import Prepared, choose, open_inputs, prepare
from onnxprune.surgery import apply_plan
from onnxprune.verify import check_valid, count_params, io_signature, random_feeds, run, zero_removed_channels


def planned(model: onnx.ModelProto, ratio: float, criterion: str = "l1", round_to: int = 1,
            exclude: tuple[str, ...] = ()) -> tuple[Prepared, Plan]:
    """The prepared model and the plan a data-free run at `ratio` would apply to it."""
    target, options = Target.ratio(ratio), Options(criterion=criterion, round_to=round_to, exclude=exclude)
    inputs = open_inputs(model, target, options)
    return inputs.prepared, choose(inputs, target, options).plan


def prune_exact(model: onnx.ModelProto, ratio: float = 0.5, criterion: str = "l1", round_to: int = 1,
                atol: float = 1e-5, batch: int = 2, exclude: tuple[str, ...] = (), exact_groups_only: bool = False,
                length: int = 1):
    """Zero the channels the plan removes in the original, prune that model with the same plan, and require the
    same onnxruntime outputs; also require a valid model with unchanged inputs and outputs, that the plan removes
    channels and that the pruned model has fewer parameters (a test that prunes nothing checks nothing).

    `exact_groups_only` leaves out groups marked inexact (a LayerNorm over the channels), whose removal changes the
    outputs by design. `length` is the size of every run-time dimension but the batch in the test inputs (a
    sequence, an image side): at 1, attention has one position to attend to. Returns (pruned model, analysis, plan)."""
    prepared, plan = planned(model, ratio, criterion, round_to, exclude)
    if exact_groups_only:
        plan.keep = {g: k for g, k in plan.keep.items() if not prepared.analysis.groups[g].inexact}
    assert removed_channels(prepared.analysis, plan) > 0, "the plan removes no channel"
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, plan)
    again = prepare(zeroed, exclude)
    pruned = apply_plan(again.model, again.analysis, plan)
    assert count_params(pruned) < count_params(prepared.model), "pruning removed no parameter"
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(model)
    feeds = feeds_at(model, seed=1, batch=batch, length=length)
    expected, got = run(zeroed, feeds), run(pruned, feeds)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=atol * output_scale(e), rtol=1e-4)
    return pruned, prepared.analysis, plan


def output_scale(values: np.ndarray) -> float:
    """The size float32 rounding is relative to: an output element that is the difference of large terms (a model
    whose outputs reach 1e6 with random weights) carries their rounding error, however small the element is."""
    finite = np.abs(values[np.isfinite(values)]) if np.size(values) else np.zeros(1)
    return max(1.0, float(finite.max(initial=0.0)))


def removed_channels(analysis: Analysis, plan: Plan) -> int:
    """How many channels the plan removes, over all groups."""
    return sum(analysis.groups[g].size - len(kept) for g, kept in plan.keep.items())


def feeds_at(model: onnx.ModelProto, seed: int, batch: int, length: int) -> dict[str, np.ndarray]:
    """`verify.random_feeds` with every run-time dimension but the first at `length` instead of 1 (same draws)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = onnx.ModelProto()
    inputs.graph.input.extend(vi for vi in model.graph.input if vi.name not in inits)
    for vi in inputs.graph.input:
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if axis > 0 and not dim.HasField("dim_value"):
                dim.dim_value = length
    return random_feeds(inputs, seed=seed, batch=batch)


def params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer))
