"""The sparsity step: zero weights of every Conv, ConvTranspose, Gemm and MatMul with a constant weight, layer by
layer in graph order, as a `Request` says.

Data-driven criteria and least-squares recovery read each layer's inputs from the model as sparsified so far
(errors made upstream are seen, and compensated by the re-fit) and its outputs from the `reference` model: the
Gram matrix and cross terms of recovery's normal equations (`least_squares.NormalEquations`), from one forward
sweep of each model over the calibration data (`recover.layer_sweep`).
Layers whose inputs are not cut into rows (ConvTranspose, grouped convolutions, batched MatMul weights) are
sparsified by magnitude and not re-fitted; the report says so per layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import GraphIndex
from ..groups import name_matches
from ..layers import Layer, StoredTensors, describe
from ..least_squares import NormalEquations
from ..recover import LayerSweep, layer_sweep
from .masks import keep_mask
from .refit import masked_refit
from .sparsegpt import sparsegpt
from .spec import DATA_CRITERIA, Request

log = logging.getLogger("onnxprune")

Batches = Callable[[], Iterator[dict]]
POSITIONS = 64  # sampled output positions per image, as recovery's least squares


@dataclass
class LayerShare:
    """One layer to sparsify: its description and the share of its weights to zero."""

    layer: Layer
    ratio: float


def sparse_layers(model: onnx.ModelProto, request: Request) -> tuple[list[Layer], list[dict]]:
    """The layers to sparsify, in graph order, and those left dense with the reason."""
    index = GraphIndex.build(model)
    layers, dense = [], []
    for node in model.graph.node:
        layer = describe(node, index)
        if layer is None:
            continue
        reason = dense_reason(layer, index, request)
        if reason is None:
            layers.append(layer)
        else:
            dense.append({"node": node.name, "op": node.op_type, "weight": layer.weight, "reason": reason})
    return layers, dense


def dense_reason(layer: Layer, index: GraphIndex, request: Request) -> str | None:
    """Why a layer's weight stays dense: excluded, shared, not a float, or input channels that do not split into
    N:M blocks."""
    node, init = layer.node, index.initializers[layer.weight]
    names = [node.name, layer.weight, *node.output]
    hit = next((p for p in request.exclude for n in names if name_matches(n, p)), None)
    if hit is not None:
        return f"excluded by --exclude '{hit}'"
    readers = {id(n) for n in index.consumers.get(layer.weight, [])}
    if len(readers) > 1:
        return f"weight shared by {len(readers)} nodes"
    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                              onnx.TensorProto.BFLOAT16) or len(init.dims) < 2:
        return "weight is not a floating-point matrix or kernel"
    channels = layer.kernels(np.broadcast_to(np.zeros((), bool), tuple(init.dims))).shape[1]
    if not request.pattern.unstructured and channels % request.pattern.m:
        return f"input channels not a multiple of {request.pattern.m}"
    return None


def sparsify_layers(model: onnx.ModelProto, reference: onnx.ModelProto, shares: list[LayerShare], request: Request,
                    batches: Batches | None, quiet: bool = True) -> list[dict]:
    """Sparsify each layer of `model` in place, in order; one report entry per layer. The layers that read data
    are reached in one forward sweep of `model` and `reference` (progress shows each)."""
    fitted = [s.layer for s in shares if _wants_data(request, s.layer)] if batches is not None else []
    label = request.criterion if request.criterion in DATA_CRITERIA else "lsq"
    tensors = StoredTensors(model)
    with layer_sweep(model, reference, fitted, batches, label, quiet) as sweep:
        return [_sparsify(tensors, share, request, sweep if fitted else None, position)
                for position, share in enumerate(shares)]


def _wants_data(request: Request, layer: Layer) -> bool:
    return (request.criterion in DATA_CRITERIA or request.refit) and layer.refittable


def _sparsify(tensors: StoredTensors, share: LayerShare, request: Request, sweep: LayerSweep | None,
              position: int) -> dict:
    layer, init = share.layer, tensors.inits[share.layer.weight]
    weight = numpy_helper.to_array(init)
    rows = layer.weight_rows(weight).T  # (outputs, features), alpha folded in
    kernel = rows.shape[1] // layer.kernels(weight).shape[1]
    wanted = sweep is not None and _wants_data(request, layer)
    system = sweep.system(layer, None, np.random.default_rng(position), POSITIONS) if wanted else None
    criterion = request.criterion if system is not None else "l1"
    updated, keep = _select(rows, system, criterion, request, share.ratio, kernel)
    refitted = False
    if request.refit and system is not None:
        updated, refitted = _refit(tensors, layer, system, updated * keep, keep)
    new = _written(layer, weight, updated * keep if criterion == "sparsegpt" or refitted else None, keep)
    init.CopyFrom(numpy_helper.from_array(new, init.name))
    return {"node": layer.node.name, "op": layer.node.op_type, "weight": layer.weight, "params": int(weight.size),
            "zeros_before": int(weight.size - np.count_nonzero(weight)),
            "zeros_after": int(new.size - np.count_nonzero(new)), "criterion": criterion,
            "refitted": refitted, "note": _fallback_note(request, layer, criterion)}


def _fallback_note(request: Request, layer: Layer, criterion: str) -> str | None:
    if layer.refittable or not (request.criterion in DATA_CRITERIA or request.refit):
        return None
    return (f"{layer.node.op_type} inputs are not cut into rows (grouped, transposed or batched weight): "
            f"{criterion} and no re-fit")


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _select(rows: np.ndarray, system: NormalEquations | None, criterion: str, request: Request, ratio: float,
            kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, kept mask): the criterion's choice; sparsegpt also updates the kept weights."""
    features = rows.shape[1]
    if criterion == "sparsegpt":
        return sparsegpt(rows, system.gram[:features, :features], request.pattern, ratio, kernel)
    if criterion == "wanda":
        norms = np.sqrt(np.maximum(np.diag(system.gram)[:features], 0.0))
        return rows, keep_mask(np.abs(rows) * norms[None, :], request.pattern, ratio, kernel, per_row=True)
    return rows, keep_mask(np.abs(rows), request.pattern, ratio, kernel, per_row=False)


def _refit(tensors: StoredTensors, layer: Layer, system: NormalEquations, rows: np.ndarray,
           keep: np.ndarray) -> tuple[np.ndarray, bool]:
    """Masked least squares of the kept weights and the bias; (rows, whether anything changed)."""
    bias = tensors.bias_in_output(layer, len(rows))
    if bias is None:
        system.drop_bias()
    current = rows.T if bias is None else np.concatenate([rows.T, bias[None, :]])
    fitted = masked_refit(system, current, keep)
    changed = not np.array_equal(fitted, current)
    if changed and bias is not None and np.any(fitted[-1] != bias):
        tensors.add_to_bias(layer, (fitted[-1] - bias).astype(np.float32))
    return fitted[:rows.shape[1]].T, changed


def _written(layer: Layer, weight: np.ndarray, rows: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """The new weight in the model's layout and type: computed `rows`, or the original with the zeros applied
    (bit for bit elsewhere). Computed values that are not finite in the model's type are refused: mask only."""
    new = weight.copy()
    if rows is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            computed = layer.rows_to_weight(rows.T, weight)
        if np.isfinite(computed.astype(np.float64)).all():
            new = computed
        else:
            log.warning("%s '%s': the computed weights overflow its type; only the zeros are applied",
                        layer.node.op_type, layer.node.name)
    kernels = layer.kernels(new)
    kernels[~keep.reshape(kernels.shape)] = 0
    return new


def count_nonzeros(model: onnx.ModelProto) -> int:
    """Non-zero values over all the model's initializers."""
    return int(sum(np.count_nonzero(numpy_helper.to_array(i)) for i in model.graph.initializer))


def magnitude_zeros(model: onnx.ModelProto, layer: Layer, ratio: float, request: Request) -> onnx.TensorProto:
    """The layer's weight in `model` with the `ratio` smallest magnitudes zeroed, as a new tensor; the model is
    not changed."""
    init = _initializer(model, layer.weight)
    weight = numpy_helper.to_array(init)
    rows = layer.weight_rows(weight).T
    keep = keep_mask(np.abs(rows), request.pattern, ratio, rows.shape[1] // layer.kernels(weight).shape[1], False)
    return numpy_helper.from_array(_written(layer, weight, None, keep), init.name)
