"""Training-free recovery after pruning.

`bias`: a removed channel still carried a mean value into each consumer layer; add that mean contribution to the
consumer's bias, so the layer's output keeps its mean (exact when the removed channels were constant).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .allocate import Plan
from .calibrate import with_outputs, mask_input, padding_of, real_positions
from .criteria import consumers
from .graph import node_attr
from .groups import Analysis, Group, Member
from .patches import conv_patches, input_rows

log = logging.getLogger("onnxprune")

RECOVERY = ("none", "bias", "lsq")


def recover_bias(pruned: onnx.ModelProto, analysis: Analysis, plan: Plan, stats, original: onnx.ModelProto | None = None,
                 batches=None) -> int:
    """Fold the removed channels' mean contributions into the consumers' biases; returns the layers changed.

    The means are the original model's, so deep in a network whose upstream layers were pruned they can miss (on a
    transformer pruned by l1 they made the outputs far worse). With the `original` model and calibration `batches()`,
    the change is kept only if it brings the pruned model's outputs closer to the original's."""
    deltas: dict[str, np.ndarray] = {}
    for gid, keep in plan.keep.items():
        group = analysis.groups[gid]
        removed = np.setdiff1d(np.arange(group.size), keep)
        for node, data in consumers(group, analysis.index):
            delta = _mean_contribution(node, data, group, removed, analysis, stats)
            if delta is not None:
                deltas[node.name] = deltas.get(node.name, 0) + delta
    trial = copy.deepcopy(pruned) if original is not None else pruned
    nodes = {n.name: n for n in trial.graph.node}
    changed = 0
    for name, delta in deltas.items():
        kept = _kept_outputs(nodes[name], analysis, plan)
        changed += _add_bias(trial, nodes[name], delta if kept is None else delta[kept])
    if changed and original is not None:
        before, after = (output_error(m, original, batches()) for m in (pruned, trial))
        if after >= before:
            log.warning("bias recovery left out: it made the outputs on calibration data worse "
                        "(relative squared error %.4f -> %.4f)", before, after)
            return 0
        pruned.CopyFrom(trial)
    return changed


def output_error(model: onnx.ModelProto, original: onnx.ModelProto, batches, samples: int = 64) -> float:
    """Squared error of `model`'s outputs relative to the `original`'s energy, summed over outputs, on up to
    `samples` calibration samples (real positions only where the model has a padding mask)."""
    from .verify import session
    first, second = session(original, threads=0), session(model, threads=0)
    mask, seen, error, energy = mask_input(original), 0, 0.0, 0.0
    for feed in batches:
        real = padding_of(feed, mask)
        for a, b in zip(first.run(None, feed), second.run(None, feed)):
            a, b = real_positions(a, real).astype(np.float64), real_positions(b, real).astype(np.float64)
            error, energy = error + float(np.sum((a - b) ** 2)), energy + float(np.sum(a ** 2))
        seen += len(next(iter(feed.values())))
        if seen >= samples:
            break
    return error / max(energy, 1e-30)


def _mean_contribution(node: onnx.NodeProto, data: Member, group: Group, removed: np.ndarray,
                       analysis: Analysis, stats) -> np.ndarray | None:
    index = analysis.index
    idx = data.offset + (removed[:, None] * data.inner + np.arange(data.inner)).ravel()
    mean = stats.channels[data.space].mean[idx]
    weight = index.array(node.input[1])
    if node.op_type == "Conv" and node_attr(node, "group", 1) == 1:
        return weight[:, idx].reshape(weight.shape[0], len(idx), -1).sum(2) @ mean
    if node.op_type == "Gemm" and not node_attr(node, "transA", 0):
        return weight[:, idx] @ mean if node_attr(node, "transB", 0) else mean @ weight[idx, :]
    if node.op_type == "MatMul" and weight is not None and weight.ndim == 2 and data.space[0] == node.input[0]:
        return mean @ weight[idx, :]
    return None


def _add_bias(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray) -> int:
    """Add `delta` to the bias the node's outputs get: Conv and Gemm inputs, or the Add that follows a MatMul."""
    if node.op_type == "Conv":
        return _add_to_input(model, node, 2, delta)
    if node.op_type == "Gemm":
        beta = node_attr(node, "beta", 1.0)
        return _add_to_input(model, node, 2, delta / beta) if beta else 0
    add = _bias_add(model, node)
    if add is not None:
        return _add_to_input(model, *add, delta, create=False)
    log.warning("bias recovery skipped for %s '%s': no bias to adjust", node.op_type, node.name)
    return 0


def _bias_add(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
    """The Add right after a MatMul that holds its bias, and which of its inputs is the bias."""
    follower = [n for n in model.graph.node if node.output[0] in n.input]
    if len(follower) == 1 and follower[0].op_type == "Add":
        return follower[0], 1 - list(follower[0].input).index(node.output[0])
    return None


def _add_to_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int, delta: np.ndarray,
                  create: bool = True) -> int:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    name = node.input[index] if index < len(node.input) else ""
    if name and name not in inits:
        return 0  # a bias computed at run time
    if name:
        bias = numpy_helper.to_array(inits[name])
        if bias.shape[-1:] != delta.shape:
            return 0
        users = sum(list(n.input).count(name) for n in graph.node)
        new_name = name if users == 1 else f"{name}_recovered_{node.name}"
        updated = numpy_helper.from_array((bias + delta).astype(bias.dtype), new_name)
        if users == 1:
            inits[name].CopyFrom(updated)
        else:
            graph.initializer.append(updated)
            node.input[index] = updated.name
        return 1
    if not create:
        return 0
    bias = numpy_helper.from_array(delta.astype(np.float32), f"{node.name}_recovered_bias")
    graph.initializer.append(bias)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = bias.name
    return 1


# ------------------------------------------------------------------------------------------------ least squares

_REFIT_OPS = ("Conv", "Gemm", "MatMul")


def refit_layers(analysis: Analysis, plan: Plan) -> list[str]:
    """Names of the layers that lost input channels and can be re-fitted, in graph order."""
    names: set[str] = set()
    for gid in plan.keep:
        for node, _ in consumers(analysis.groups[gid], analysis.index):
            if node.op_type in _REFIT_OPS and node_attr(node, "group", 1) == 1 and not node_attr(node, "transA", 0):
                names.add(node.name)
    return [n.name for n in analysis.index.model.graph.node if n.name in names]


def recover_lsq(pruned: onnx.ModelProto, original: onnx.ModelProto, analysis: Analysis, plan: Plan,
                batches, ridge: float = 1e-5, positions: int = 64, quiet: bool = True) -> int:
    """Re-fit, layer by layer in graph order, each layer that lost input channels so that its outputs on the
    calibration data match the original model's: ridge-regularised least squares on the pruned model's own inputs
    to that layer, so errors made upstream are compensated too. `batches()` yields the calibration feeds afresh.
    A fit that does not reduce the layer's error leaves the layer as it was. Returns the layers changed."""
    from .verify import session

    original_nodes = {n.name: n for n in original.graph.node}
    mask = mask_input(original)
    changed = 0
    layers = refit_layers(analysis, plan)
    for position, name in enumerate(layers):
        node = next(n for n in pruned.graph.node if n.name == name)
        reference = with_outputs(original, [original_nodes[name].output[0]])
        current = with_outputs(pruned, [node.input[0]])
        target_session, input_session = session(reference, threads=0), session(current, threads=0)
        kept = _kept_outputs(node, analysis, plan)
        system = _NormalEquations()
        rng = np.random.default_rng(position)
        for feed in batches():
            target = target_session.run([original_nodes[name].output[0]], feed)[0]
            inputs = input_session.run([node.input[0]], feed)[0]
            if kept is not None:
                target = np.take(target, kept, axis=1 if node.op_type != "MatMul" else -1)
            system.add(*_rows(node, inputs, target, rng, positions, padding_of(feed, mask)))
        changed += _apply_fit(pruned, node, system, ridge)
        if not quiet:
            log.info("recovered %s (%d/%d)", name, position + 1, len(layers))
    return changed


def _kept_outputs(node: onnx.NodeProto, analysis: Analysis, plan: Plan) -> np.ndarray | None:
    output = node.output[0]
    axis = len(analysis.index.shapes[output]) - 1 if node.op_type == "MatMul" else 1
    return analysis.kept_indices((output, axis), plan.keep)


def _rows(node: onnx.NodeProto, inputs: np.ndarray, target: np.ndarray, rng: np.random.Generator,
          positions: int, real: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) rows: im2col patches at sampled output positions for a Conv, rows of the input for
    Gemm and MatMul (padded sequence positions left out); a column of ones for the bias."""
    if node.op_type == "Conv":
        patches, images, oy, ox = conv_patches(node, inputs, rng, positions)
        features, target = patches.reshape(len(patches), -1), target[images, :, oy, ox]
    else:
        inputs, target = real_positions(inputs, real), real_positions(target, real)
        features, pick = input_rows(inputs, rng, positions * 16)
        target = target.reshape(-1, target.shape[-1])[pick]
    ones = np.ones((len(features), 1), features.dtype)
    return np.concatenate([features, ones], axis=1).astype(np.float64), target.astype(np.float64)


class _NormalEquations:
    """Running F^T F, F^T T and ||T||^2: memory fixed by the layer's size, not by the samples."""

    def __init__(self) -> None:
        self.gram = self.cross = None
        self.target_energy = 0.0

    def add(self, features: np.ndarray, target: np.ndarray) -> None:
        if self.gram is None:
            self.gram = np.zeros((features.shape[1],) * 2)
            self.cross = np.zeros((features.shape[1], target.shape[1]))
        self.gram += features.T @ features
        self.cross += features.T @ target
        self.target_energy += float((target ** 2).sum())

    def drop_bias(self) -> None:
        self.gram, self.cross = self.gram[:-1, :-1], self.cross[:-1]

    def error(self, weights: np.ndarray) -> float:
        """Squared error of `weights` (features x outputs) on everything seen."""
        return float(np.einsum("ij,ik,kj->", weights, self.gram, weights) - 2 * (weights * self.cross).sum()
                     + self.target_energy)

    def solve(self, ridge: float) -> np.ndarray | None:
        size = len(self.gram)
        damping = ridge * max(float(np.trace(self.gram)) / size, 1e-12)
        try:
            return np.linalg.solve(self.gram + damping * np.eye(size), self.cross)
        except np.linalg.LinAlgError:
            try:
                return np.linalg.lstsq(self.gram, self.cross, rcond=None)[0]
            except np.linalg.LinAlgError:
                return None


def _apply_fit(model: onnx.ModelProto, node: onnx.NodeProto, system: _NormalEquations, ridge: float) -> int:
    if system.gram is None:
        return 0
    inits = {i.name: i for i in model.graph.initializer}
    weight = numpy_helper.to_array(inits[node.input[1]])
    as_rows = _weight_rows(node, weight)  # (features, outputs), bias row appended
    bias = _current_bias(model, node, inits, as_rows.shape[1])
    if bias is None:  # nowhere to put a bias (a MatMul without an Add after it): fit without one
        system.drop_bias()
        bias = np.zeros(as_rows.shape[1])
        current = as_rows
    else:
        current = np.concatenate([as_rows, bias[None, :]], axis=0)
    fitted = system.solve(ridge)
    if fitted is None or not np.all(np.isfinite(fitted)) or system.error(fitted) >= system.error(current):
        log.info("least-squares recovery kept %s '%s' as it was", node.op_type, node.name)
        return 0
    rows = fitted[:as_rows.shape[0]]
    new_weight = _rows_to_weight(node, rows, weight).astype(weight.dtype)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_weight, node.input[1]))
    if len(fitted) > len(rows):
        _add_bias(model, node, (fitted[-1] - bias).astype(np.float32))
    return 1


def _weight_rows(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T.astype(np.float64)
    alpha = node_attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    rows = weight.T if node.op_type == "Gemm" and node_attr(node, "transB", 0) else weight
    return rows.astype(np.float64) * alpha


def _rows_to_weight(node: onnx.NodeProto, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return rows.T.reshape(like.shape)
    alpha = node_attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    rows = rows / alpha
    return rows.T if node.op_type == "Gemm" and node_attr(node, "transB", 0) else rows


def _current_bias(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict, outputs: int) -> np.ndarray | None:
    """The bias the layer's outputs get now (Conv/Gemm input, or the Add after a MatMul); zeros where a Conv or
    Gemm has none yet, None where there is no place for one."""
    if node.op_type in ("Conv", "Gemm"):
        name = node.input[2] if len(node.input) > 2 else ""
        scale = node_attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
    else:
        add = _bias_add(model, node)
        name = add[0].input[add[1]] if add is not None else ""
        scale = 1.0
    if name in inits:
        bias = numpy_helper.to_array(inits[name]).astype(np.float64).reshape(-1) * scale
        return bias if bias.shape == (outputs,) else None
    return np.zeros(outputs) if node.op_type in ("Conv", "Gemm") and not name else None
