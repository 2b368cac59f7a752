"""The pipeline's sparsity step and what it reports: zeros per layer, non-zero parameters before and after, the
layers left dense and why, and what the zeros do (and do not do) for speed."""
from __future__ import annotations

import onnx

from .allocation import layer_shares
from .sparsify import Batches, count_nonzeros, sparse_layers, sparsify_layers
from .spec import SPEED_NOTE, Request


def sparsity_step(model: onnx.ModelProto, reference: onnx.ModelProto, request: Request, nonzeros_before: int,
                  batches: Batches | None, quiet: bool = True) -> dict:
    """Sparsify `model` in place (its layers' outputs fitted to `reference`'s where the request re-fits); the
    report's `sparsity` object."""
    layers, dense = sparse_layers(model, request)
    shares = layer_shares(model, layers, request, nonzeros_before, batches)
    entries = sparsify_layers(model, reference, shares, request, batches, quiet)
    return {"granularity": str(request.pattern), "ratio": request.ratio, "target_params": request.keep_params,
            "criterion": request.criterion, "allocation": request.allocation,
            "recovery": "lsq" if request.refit else "none", "layers": entries, "dense": dense,
            "nonzero_params_before": nonzeros_before, "nonzero_params_after": count_nonzeros(model),
            "speed": SPEED_NOTE}


def summary_lines(sparsity: dict) -> list[str]:
    """The summary's sparsity lines."""
    layers = sparsity["layers"]
    params = sum(e["params"] for e in layers)
    zeros = sum(e["zeros_after"] for e in layers)
    refitted = sum(e["refitted"] for e in layers)
    share = f"{zeros / params:.1%} of their weights zero" if params else "no weights"
    share += f", {refitted} re-fitted" if sparsity["recovery"] == "lsq" else ""
    lines = [f"sparsity    {sparsity['granularity']} by {sparsity['criterion']}, recovery {sparsity['recovery']}: "
             f"{len(layers)} layers, {share}" + (f"; {len(sparsity['dense'])} left dense" if sparsity["dense"] else "")]
    before, after = sparsity["nonzero_params_before"], sparsity["nonzero_params_after"]
    lines.append(f"non-zeros   {before:>14,} -> {after:>14,}  ({after / max(before, 1):.1%} kept)")
    lines += [f"  dense: {reason} ({count} layer(s))" for reason, count in _reasons(sparsity["dense"])[:6]]
    notes = sorted({e["note"] for e in layers if e["note"]})
    lines += [f"  note: {note}" for note in notes[:3]]
    lines.append(f"speed       {sparsity['speed']}")
    return lines


def _reasons(dense: list[dict]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for entry in dense:
        counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])
