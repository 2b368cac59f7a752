"""Training-free recovery after pruning.

`bias`: a removed channel still carried a mean value into each consumer layer; add that mean contribution to the
consumer's bias, so the layer's output keeps its mean (exact when the removed channels were constant).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .allocate import Plan
from .bias_folding import folded_values
from .calibrate import Progress, mask_input, padding_of
from .criteria import consumers
from .errors import OnnxPruneError
from .groups import Analysis
from .layers import Layer, StoredTensors, constant_values, real_positions, refittable
from .least_squares import HOLDOUT_EVERY, NormalEquations
from .sweep import MEMORY_BUDGET, ForwardSweep, SpillStore, spill_store
from .verify import session

log = logging.getLogger("onnxprune")

RECOVERY = ("none", "bias", "lsq")


def recover_bias(pruned: onnx.ModelProto, analysis: Analysis, plan: Plan, stats, original: onnx.ModelProto | None = None,
                 batches=None) -> int:
    """Fold the removed channels' mean contributions into the consumers' biases; returns the layers changed.

    The means are the original model's, so deep in a network whose upstream layers were pruned they can miss (on a
    transformer pruned by l1 they made the outputs far worse). With the `original` model and calibration `batches()`,
    the change is kept only if it brings the pruned model's outputs closer to the original's."""
    contributions = _mean_contributions(analysis, plan, stats)
    trial = copy.deepcopy(pruned) if original is not None else pruned
    tensors, changed = StoredTensors(trial), 0
    for layer, delta in contributions.values():
        kept = _kept_outputs(layer, analysis, plan)
        changed += _add_bias(tensors, layer, delta if kept is None else delta[kept])
    if changed and original is not None:
        before, after = (output_error(m, original, batches()) for m in (pruned, trial))
        if not (after < before):  # also refuses a NaN error
            log.warning("bias recovery left out: it did not bring the outputs on calibration data closer to the "
                        "original's (relative squared error %.4f -> %.4f)", before, after)
            return 0
        pruned.CopyFrom(trial)
    return changed


def output_error(model: onnx.ModelProto, original: onnx.ModelProto, batches, samples: int = 64) -> float:
    """Squared error of `model`'s outputs relative to the `original`'s energy, summed over outputs, on up to
    `samples` calibration samples (real positions only where the model has a padding mask)."""
    first, second = session(original, threads=0), session(model, threads=0)
    mask, seen, error, energy = mask_input(original), 0, 0.0, 0.0
    for feed in batches:
        real = padding_of(feed, mask)
        for a, b in zip(first.run(None, feed), second.run(None, feed)):
            a, b = real_positions(a, real).astype(np.float64), real_positions(b, real).astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):  # NaN or Inf outputs give a NaN or Inf error
                error, energy = error + float(np.sum((a - b) ** 2)), energy + float(np.sum(a ** 2))
        seen += len(next(iter(feed.values())))
        if seen >= samples:
            break
    return error / max(energy, 1e-30)


def _mean_contributions(analysis: Analysis, plan: Plan, stats) -> dict[str, tuple[Layer, np.ndarray]]:
    """Per re-fittable layer that lost input channels, what the removed channels added to its outputs on average."""
    found: dict[str, tuple[Layer, np.ndarray]] = {}
    for gid, keep in plan.keep.items():
        group = analysis.groups[gid]
        removed = np.setdiff1d(np.arange(group.size), keep)
        for node, data in consumers(group, analysis.index):
            layer = refittable(node, analysis.index, quantized=True)
            if layer is None or data.space[0] != node.input[0]:
                continue
            features = data.offset + (removed[:, None] * data.inner + np.arange(data.inner)).ravel()
            mean = stats.channels[data.space].mean
            beyond = mean[features] - folded_values(analysis, data.space, len(mean))[features]  # surgery's part
            delta = layer.mean_contribution(constant_values(layer.weight, analysis.index), features, beyond)
            found[node.name] = (layer, found.get(node.name, (layer, 0))[1] + delta)
    return found


def _add_bias(tensors: StoredTensors, layer: Layer, delta: np.ndarray) -> int:
    if layer.bias is None:
        log.warning("bias recovery skipped for %s '%s': no bias to adjust", layer.node.op_type, layer.node.name)
        return 0
    if not np.all(np.isfinite(delta)):
        log.warning("bias recovery skipped for %s '%s': the removed channels' mean contribution is not finite",
                    layer.node.op_type, layer.node.name)
        return 0
    return tensors.add_to_bias(layer, delta)


def require_finite_weights(pruned: onnx.ModelProto, analysis: Analysis, plan: Plan, recovery: str) -> None:
    """Before the model is written: the tensors recovery may have computed (weight and bias of every layer that lost
    input channels) hold no NaN or Inf, else a one-line error. Surgery only slices the input's tensors, so without
    recovery nothing new was computed and nothing is read (a model's own -Inf masks stay as they are)."""
    if recovery == "none":
        return
    inits = {i.name: i for i in pruned.graph.initializer}
    for name in _recovered_tensors(pruned, refit_layers(analysis, plan)):
        if name in inits and _nonfinite_values(numpy_helper.to_array(inits[name])):
            raise OnnxPruneError(f"{recovery} recovery left NaN or Inf in '{name}'; the pruned model is not written")


def _recovered_tensors(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """The weight and the bias tensor (where there is one now) of each layer."""
    nodes = {n.name: n for n in model.graph.node}
    names = [layer.weight for layer in layers]
    for site in (layer.bias for layer in layers if layer.bias is not None and layer.bias.node in nodes):
        inputs = nodes[site.node].input
        names += [inputs[site.input]] if site.input < len(inputs) and inputs[site.input] else []
    return names


def _nonfinite_values(array: np.ndarray) -> bool:
    return array.dtype.kind in "fc" and not np.isfinite(array).all()


# ------------------------------------------------------------------------------------------------ least squares

def refit_layers(analysis: Analysis, plan: Plan, reference: onnx.ModelProto | None = None) -> list[Layer]:
    """The layers least squares re-fits, in graph order: those that lost input channels, and every other re-fittable
    layer whose input the pruning changed (downstream of a pruned group): its inputs drift from the original's, and
    fitting it to the original's outputs corrects what was lost upstream (on MiniLM at half the MACs, cosine 0.901
    -> 0.918). With a `reference`, those others only where it computes the layer's output under the same name
    (slicing's reference has no projection slicing added)."""
    found = _lost_inputs(analysis, plan)
    drifted = _downstream_of_removals(analysis, plan)
    computed = None if reference is None else {name for node in reference.graph.node for name in node.output}
    for node in analysis.index.model.graph.node:
        if node.name not in found and node.input and node.input[0] in drifted:
            layer = refittable(node, analysis.index, quantized=True)
            if layer is not None and (computed is None or node.output[0] in computed):
                found[node.name] = layer
    return [found[n.name] for n in analysis.index.model.graph.node if n.name in found]


def _lost_inputs(analysis: Analysis, plan: Plan) -> dict[str, Layer]:
    """The re-fittable layers that read a group of the plan, by node name."""
    found: dict[str, Layer] = {}
    for gid in plan.keep:
        for node, _ in consumers(analysis.groups[gid], analysis.index):
            layer = refittable(node, analysis.index, quantized=True)
            if layer is not None:
                found[node.name] = layer
    return found


def _downstream_of_removals(analysis: Analysis, plan: Plan) -> set[str]:
    """Every tensor computed from a tensor of a group that lost channels."""
    index, frontier = analysis.index, []
    for gid, keep in plan.keep.items():
        group = analysis.groups[gid]
        if len(keep) < group.size:
            frontier += [m.space[0] for m in group.members if not m.constant]
    reached = set(frontier)
    while frontier:
        for node in index.consumers.get(frontier.pop(), []):
            fresh = [name for name in node.output if name and name not in reached]
            reached.update(fresh)
            frontier += fresh
    return reached


def recover_lsq(pruned: onnx.ModelProto, original: onnx.ModelProto, analysis: Analysis, plan: Plan,
                batches, positions: int = 64, quiet: bool = True,
                budget: int = MEMORY_BUDGET) -> int:
    """Re-fit, layer by layer in graph order, the layers refit_layers names (those that lost input channels and
    those whose inputs the pruning changed) so that their outputs on the calibration data match the original
    model's: least squares on the pruned model's own inputs, each with the layers before it already re-fitted, so
    errors made upstream are compensated too, with a ridge towards the current weights chosen on held-out
    calibration rows (least_squares.NormalEquations.fit). `batches()` yields the calibration feeds; both models are
    run once, in one forward sweep (see LayerSweep), keeping up to `budget` bytes of activations in memory. A fit
    that does not reduce the layer's error leaves the layer as it was. Returns the layers changed."""
    changed, tensors = 0, StoredTensors(pruned)
    layers = refit_layers(analysis, plan, original)
    with layer_sweep(pruned, original, layers, batches, "lsq", quiet, budget) as sweep:
        for position, layer in enumerate(layers):
            kept = _kept_outputs(layer, analysis, plan)
            system = sweep.system(layer, kept, np.random.default_rng(position), positions)
            if not system.finite:
                raise OnnxPruneError(f"least-squares statistics of '{layer.node.input[0]}' are not finite: the "
                                     "model's activations overflow or are NaN on the calibration data")
            changed += _apply_fit(tensors, layer, system)
    return changed


class LayerSweep:
    """Per layer, in graph order: the normal equations of its inputs in `model` (with every change made to the
    layers before it) against its outputs in `reference`, on the calibration feeds. Each model is run once over the
    calibration data in a forward sweep (sweep.ForwardSweep), so the work grows linearly with depth; a running
    re-fit reads the same values a run of the whole model would give."""

    def __init__(self, model: onnx.ModelProto, reference: onnx.ModelProto, layers: list[Layer], feeds: list,
                 store: SpillStore, progress: tuple[str, Progress]):
        self.inputs = ForwardSweep(model, [layer.node.input[0] for layer in layers], feeds, store)
        self.outputs = ForwardSweep(reference, [layer.node.output[0] for layer in layers], feeds, store)
        mask = mask_input(reference)
        self.real = [padding_of(feed, mask) for feed in feeds]
        self.label, self.progress = progress
        self.done, self.total = 0, len(layers)

    def system(self, layer: Layer, kept: np.ndarray | None, rng: np.random.Generator,
               positions: int) -> NormalEquations:
        """The layer's rows at `positions` sampled positions per image (drawn from `rng`), its `kept` outputs."""
        self.done += 1
        self.progress.show(f"{self.label} {self.done}/{self.total} {layer.node.name}")
        system = NormalEquations()
        inputs, targets = self.inputs.values(layer.node.input[0]), self.outputs.values(layer.node.output[0])
        numbered = len(self.real) >= HOLDOUT_EVERY  # enough batches to hold whole ones out
        for batch, real in enumerate(self.real):
            target = targets[batch] if kept is None else np.take(targets[batch], kept, axis=layer.output_axis)
            system.add(*_rows(layer, inputs[batch], target, rng, positions, real), batch if numbered else None)
        return system


@contextmanager
def layer_sweep(model: onnx.ModelProto, reference: onnx.ModelProto, layers: list[Layer], batches, label: str,
                quiet: bool, budget: int = MEMORY_BUDGET) -> Iterator[LayerSweep]:
    """A LayerSweep over the calibration feeds `batches()` (read once, when there are layers), its values cached in
    a spill store of `budget` bytes whose files are removed when the body ends; progress shows each layer."""
    progress = Progress(enabled=not quiet)
    with spill_store(budget) as store:
        feeds = [{name: store.keep(value) for name, value in feed.items()} for feed in batches()] if layers else []
        try:
            yield LayerSweep(model, reference, layers, feeds, store, (label, progress))
        finally:
            progress.close()


def _kept_outputs(layer: Layer, analysis: Analysis, plan: Plan) -> np.ndarray | None:
    return analysis.kept_indices((layer.node.output[0], layer.output_axis), plan.keep)


def _rows(layer: Layer, inputs: np.ndarray, target: np.ndarray, rng: np.random.Generator,
          positions: int, real: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) rows at sampled positions (see Layer.sample), with a column of ones for the bias."""
    sample = layer.sample(inputs, rng, positions, real)
    features, target = sample.patches.reshape(len(sample.patches), -1), layer.output_rows(target, sample)
    ones = np.ones((len(features), 1), features.dtype)
    return np.concatenate([features, ones], axis=1).astype(np.float64), target.astype(np.float64)


def _apply_fit(tensors: StoredTensors, layer: Layer, system: NormalEquations) -> int:
    if system.gram is None:
        return 0
    weight = tensors.stored_value(layer.weight)  # a QDQ weight dequantized
    as_rows = layer.weight_rows(weight)  # (features, outputs)
    bias = tensors.bias_in_output(layer, as_rows.shape[1])
    if bias is None:  # nowhere to put a bias (a MatMul without an Add after it): fit without one
        system.drop_bias()
        bias = np.zeros(as_rows.shape[1])
        current = as_rows
    else:
        current = np.concatenate([as_rows, bias[None, :]], axis=0)
    fitted = _as_stored_rows(tensors, layer, _held_out_fit(system, current), weight, len(as_rows))
    lowers = _lowers_error(system, fitted, current)
    update = _fitted_update(layer, fitted, weight, bias, len(as_rows)) if lowers else None
    # A QDQ weight is re-quantized with its scale and zero point; integer data shared with other nodes stays.
    if update is None or not tensors.store_value(layer.weight, update[0]):
        log.info("least-squares recovery kept %s '%s' as it was", layer.node.op_type, layer.node.name)
        return 0
    bias_delta = update[1]
    if bias_delta is not None:
        tensors.add_to_bias(layer, bias_delta)
    return 1


def _held_out_fit(system: NormalEquations, current: np.ndarray) -> np.ndarray | None:
    """The fit of the outputs it improves on held-out rows, the current weights of the others; None if none."""
    fit = system.fit(current)
    return np.where(fit.better[None, :], fit.weights, current) if fit.better.any() else None


def _as_stored_rows(tensors: StoredTensors, layer: Layer, fitted: np.ndarray | None, weight: np.ndarray,
                    features: int) -> np.ndarray | None:
    """The fit as the model will hold it: a QDQ weight re-quantized (rounded, clipped to its integers), so that the
    error check judges what is written; a float fit as it is."""
    if fitted is None or not layer.quantized or not np.all(np.isfinite(fitted)):
        return fitted
    stored = tensors.as_stored(layer.weight, layer.rows_to_weight(fitted[:features], weight))
    return np.concatenate([layer.weight_rows(stored), fitted[features:]])


def _fitted_update(layer: Layer, fitted: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   features: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The fitted weight in the model's type and the change of the bias (None when fitted without one); None where
    a value becomes NaN or Inf once cast (a fit beyond the type's range)."""
    new_weight = _cast(layer.rows_to_weight(fitted[:features], weight), weight.dtype)
    with_bias = len(fitted) > features
    bias_delta = _cast(fitted[-1] - bias, np.dtype(np.float32)) if with_bias else None
    if new_weight is None or (with_bias and bias_delta is None):
        return None
    return new_weight, bias_delta


def _cast(weight: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """`weight` in the model's type, or None where a value is NaN or Inf there (a fit that overflows the type)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = weight.astype(dtype)
    return cast if np.all(np.isfinite(cast)) else None


def _lowers_error(system: NormalEquations, fitted: np.ndarray | None, current: np.ndarray) -> bool:
    """The fit is finite and lowers the layer's error on the calibration data: `after < before` is false for a NaN
    error as well as for a worse one."""
    if fitted is None or not np.all(np.isfinite(fitted)):
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        before, after = system.error(current), system.error(fitted)
    return bool(after < before)
