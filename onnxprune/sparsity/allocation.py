"""How many of each layer's weights to zero: the N:M share everywhere, one share for every layer (`uniform`), or
shares by measured sensitivity: each layer is sparsified alone by magnitude at a few shares, the relative squared
error of the model's outputs on calibration samples is measured, and the cheapest damage per weight zeroed is taken
until the model's share (or --target-params) is met, the last step cut to meet it exactly."""
from __future__ import annotations

import logging

import numpy as np
import onnx

from ..errors import OnnxPruneError
from ..graph import GraphIndex
from ..layers import Layer
from ..recover import output_error
from .sparsify import Batches, LayerShare, count_nonzeros, magnitude_zeros
from .spec import Request

log = logging.getLogger("onnxprune")

CANDIDATE_SHARES = (0.25, 0.5, 0.625, 0.75, 0.875, 0.9375)
SENSITIVITY_SAMPLES = 64


def layer_shares(model: onnx.ModelProto, layers: list[Layer], request: Request, nonzeros_before: int,
                 batches: Batches | None) -> list[LayerShare]:
    """The share of each layer's weights to zero."""
    if not request.pattern.unstructured:
        return [LayerShare(layer, request.pattern.share) for layer in layers]
    share = overall_share(model, layers, request, nonzeros_before)
    if request.allocation != "sensitivity" or not layers:
        return [LayerShare(layer, share) for layer in layers]
    return by_sensitivity(model, layers, request, share, batches)


def overall_share(model: onnx.ModelProto, layers: list[Layer], request: Request, nonzeros_before: int) -> float:
    """--ratio, or the share of the layers' weights that leaves `keep_params` of the model's non-zeros (zeros that
    are already there count)."""
    if request.keep_params is None:
        return request.ratio
    sizes, zeros = _weight_sizes(model, layers)
    needed = count_nonzeros(model) - request.keep_params * nonzeros_before
    share = (needed + sum(zeros)) / max(sum(sizes), 1)
    if share >= 1:
        raise OnnxPruneError(f"--target-params {request.keep_params} cannot be met: the layers that can be "
                             f"sparsified hold {sum(sizes) - sum(zeros):,} of the model's {nonzeros_before:,} "
                             "non-zero parameters")
    return max(share, 0.0)


def _weight_sizes(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[int], list[int]]:
    """Per layer, its weight's size and how many of its values are zero now."""
    index = GraphIndex.build(model)
    arrays = [index.array(layer.weight) for layer in layers]
    return [a.size for a in arrays], [a.size - int(np.count_nonzero(a)) for a in arrays]


def by_sensitivity(model: onnx.ModelProto, layers: list[Layer], request: Request, share: float,
                   batches: Batches) -> list[LayerShare]:
    """Shares by measured damage per weight zeroed, meeting `share` of all the layers' weights."""
    sizes, _ = _weight_sizes(model, layers)
    feeds = list(batches(SENSITIVITY_SAMPLES))
    curves = [_curve(model, layer, request, feeds) for layer in layers]
    shares = greedy_shares(sizes, curves, share * sum(sizes))
    return [LayerShare(layer, s) for layer, s in zip(layers, shares)]


def _curve(model: onnx.ModelProto, layer: Layer, request: Request, feeds: list[dict]) -> list[tuple[float, float]]:
    """(share, damage) of zeroing the layer alone by magnitude at each candidate share."""
    init = next(i for i in model.graph.initializer if i.name == layer.weight)
    original, points = onnx.TensorProto(), []
    original.CopyFrom(init)
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    target = next(i for i in trial.graph.initializer if i.name == layer.weight)
    for share in CANDIDATE_SHARES:
        target.CopyFrom(magnitude_zeros(model, layer, share, request))
        points.append((share, output_error(trial, model, iter(feeds), SENSITIVITY_SAMPLES)))
    log.info("sensitivity: %s %s", layer.node.name, ", ".join(f"{s}:{d:.3g}" for s, d in points))
    return points


def greedy_shares(sizes: list[int], curves: list[list[tuple[float, float]]], zeroed: float) -> list[float]:
    """Take, one at a time, the next point of some layer's curve with the least damage per weight zeroed, until
    `zeroed` weights are; the last step only as far as needed. Damage is assumed to add up across layers."""
    shares, damage, taken = [0.0] * len(sizes), [0.0] * len(sizes), 0.0
    position = [0] * len(sizes)
    while taken < zeroed:
        costs = [(curve[p][1] - damage[k]) / max((curve[p][0] - shares[k]) * sizes[k], 1e-12)
                 if p < len(curve) else np.inf for k, (curve, p) in enumerate(zip(curves, position))]
        best = int(np.argmin(costs))
        if not np.isfinite(costs[best]):
            break  # every curve used up
        step = (curves[best][position[best]][0] - shares[best]) * sizes[best]
        if taken + step >= zeroed:
            shares[best] += (zeroed - taken) / sizes[best]
            break
        shares[best], damage[best] = curves[best][position[best]]
        taken += step
        position[best] += 1
    return shares
