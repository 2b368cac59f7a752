"""The accuracy gate: run the original and the pruned model on the same data in onnxruntime and compare.

Per output: top-1 agreement (argmax over axis 1; exact equality for integer outputs), cosine similarity, max and mean
absolute difference; accuracy with labels; optionally latency (warm-up, interleaved runs, median and p90, fixed
threads); parameters, MACs and sizes. Thresholds turn it into a pass / fail a pipeline can act on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .calibrate import (LABEL_KEYS, InputSpec, array_batches, arrays_for_inputs, input_specs, reject_nonfinite,
                        sample_count)
from .errors import OnnxPruneError, UsageError, first_line
from .graph import tensor_bytes
from .timing import measure_latency
from .verify import count_macs, count_params, first_sample, random_feeds, sample_shapes, session

@dataclass
class OutputComparison:
    name: str
    agreement: float | None  # top-1 agreement; None for outputs without a class axis
    cosine: float
    max_abs_diff: float
    mean_abs_diff: float


@dataclass
class CheckReport:
    samples: int
    data: str  # the data file, or "random" when none was given
    outputs: list[OutputComparison]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    latency: dict | None = None
    model: dict = field(default_factory=dict)  # params / macs / weight_bytes, before and after
    thresholds: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def summary_lines(self) -> list[str]:
        lines = []
        if self.accuracy_before is not None:
            lines.append(f"top-1 accuracy  {self.accuracy_before:.4f} -> {self.accuracy_after:.4f}  "
                         f"on {self.samples} samples")
        for out in self.outputs:
            agreement = f"agreement {out.agreement:.4f}, " if out.agreement is not None else ""
            lines.append(f"output '{out.name}': {agreement}cosine {out.cosine:.4f}, max |diff| {out.max_abs_diff:.4g}"
                         f" ({self.samples} {self.data} samples)")
        if self.latency:
            lat = self.latency
            lines.append(f"latency  {lat['before_ms']['median']:.2f} -> {lat['after_ms']['median']:.2f} ms median "
                         f"({lat['speedup']:.2f}x, {lat['threads']} thread(s), {lat['runs']} runs)")
        lines += [f"check failed: {f}" for f in self.failures]
        return lines


def load_data(path: str | Path, model: onnx.ModelProto, labels: str | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs named after the graph inputs (a single unnamed array for a one-input model) from an .npz; labels from
    `labels` (a key of the .npz or a .npy file) or a 'label' / 'labels' / 'y' array."""
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise OnnxPruneError(f"cannot read data {path}: {first_line(exc)}") from None
    found = _labels(data, labels)
    specs = input_specs(model)
    arrays = as_fed(arrays_for_inputs(data, specs, f"data {path}"), specs, f"data {path}")
    return reject_nonfinite(arrays, f"data {path}"), found


def as_fed(arrays: dict[str, np.ndarray], specs: list[InputSpec], what: str) -> dict[str, np.ndarray]:
    """The arrays in the dtypes the model's inputs take (float data cast to a float16 input's type, as calibration
    data is), checked to hold at least one sample (see calibrate.sample_count for scalar inputs)."""
    if sample_count(arrays, specs) == 0:
        raise OnnxPruneError(f"{what} holds no samples")
    fed = {}
    for spec in specs:
        value = arrays[spec.name]
        floats = value.dtype.kind == "f" and spec.dtype.kind == "f"
        fed[spec.name] = value.astype(spec.dtype) if floats and value.dtype != spec.dtype else value
    return fed


def _labels(data: dict[str, np.ndarray], labels: str | None) -> np.ndarray | None:
    if labels is None:
        return next((data.pop(k) for k in LABEL_KEYS if k in data), None)
    if labels in data:
        return data.pop(labels)
    if Path(labels).is_file():
        try:
            return np.load(labels, allow_pickle=False)
        except Exception as exc:
            raise OnnxPruneError(f"cannot read labels {labels}: {first_line(exc)}") from None
    raise OnnxPruneError(f"labels '{labels}' are neither an array in the data nor a file")


def random_data(model: onnx.ModelProto, samples: int = 8) -> dict[str, np.ndarray]:
    """Random inputs (dynamic sizes 1 but the batch): for a check without data, agreement only. A scalar input gets
    one value per sample, (samples,)."""
    batches = [random_feeds(model, seed=s) for s in range(samples)]
    return {name: (np.concatenate if np.ndim(batches[0][name]) else np.stack)([b[name] for b in batches])
            for name in batches[0]}


def check(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
          labels: np.ndarray | None = None, data_name: str = "random", min_agreement: float | None = None,
          max_drop: float | None = None, latency: bool = False, threads: int = 1, runs: int = 20,
          batch_size: int = 32) -> CheckReport:
    """Compare `pruned` with `original` on `feeds` (random inputs when None) and apply the thresholds."""
    if max_drop is not None and labels is None:
        raise UsageError("--max-drop needs labels (a 'label' array in --data, or --labels)")
    specs = input_specs(original)
    feeds = as_fed(feeds, specs, "the data") if feeds is not None else random_data(original)
    outputs, predictions = _compare(original, pruned, feeds, batch_size)
    report = CheckReport(samples=sample_count(feeds, specs), data=data_name, outputs=outputs,
                         thresholds={"min_agreement": min_agreement, "max_drop": max_drop})
    if labels is not None:
        report.accuracy_before, report.accuracy_after = (_accuracy(p, labels) for p in predictions)
    one = next(array_batches(feeds, specs, 1, 1))  # a scalar input's first value, 0-d
    if latency:
        report.latency = measure_latency(original, pruned, one, threads, runs)
    # a model with a run-time length has its MACs counted at the data's sizes
    sample = first_sample(original, {**feeds, **{s.name: one[s.name] for s in specs if s.scalar}})
    macs = lambda model: count_macs(model, sample_shapes(model, sample))  # noqa: E731
    report.model = {key: [fn(original), fn(pruned)] for key, fn in
                    (("params", count_params), ("macs", macs), ("weight_bytes", tensor_bytes))}
    report.failures = _failures(report, min_agreement, max_drop)
    return report


def _compare(original, pruned, feeds, batch_size) -> tuple[list[OutputComparison], tuple[np.ndarray, np.ndarray]]:
    first, second = session(original), session(pruned)
    names = [o.name for o in original.graph.output]
    chunks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    for chunk in array_batches(feeds, input_specs(original), None, batch_size):
        try:
            before, after = first.run(names, chunk), second.run(names, chunk)
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime cannot run the models on the data: {first_line(exc)}") from None
        for name, a, b in zip(names, before, after):
            chunks[name].append((a, b))
    comparisons = [_compare_output(name, pairs) for name, pairs in chunks.items()]
    first_output = chunks[names[0]]
    predictions = tuple(np.concatenate([np.atleast_1d(_top1(pair[k])) for pair in first_output]) for k in (0, 1))
    return comparisons, predictions


def _compare_output(name: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> OutputComparison:
    a, b = (_stacked([p[k] for p in pairs]) for k in (0, 1))
    if a.shape != b.shape:
        raise OnnxPruneError(f"output '{name}' has shape {a.shape[1:]} per sample in the first model and "
                             f"{b.shape[1:]} in the second: they do not compute the same outputs")
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1)
    cosine = float(np.mean(np.where(norms > 0, (flat_a * flat_b).sum(1) / np.maximum(norms, 1e-30),
                                    np.all(flat_a == flat_b, axis=1))))
    if not np.issubdtype(pairs[0][0].dtype, np.floating):
        agreement = float(np.mean(a == b))
    elif a.ndim >= 2 and a.shape[1] > 1:
        agreement = float(np.mean(a.argmax(1) == b.argmax(1)))
    else:
        agreement = None
    diff = np.abs(a - b)
    return OutputComparison(name, agreement, cosine, float(diff.max(initial=0)), float(diff.mean()) if diff.size else 0.0)


def _stacked(outputs: list[np.ndarray]) -> np.ndarray:
    """One run's outputs after another on axis 0, as float64 (a 0-d output of a one-sample run is one row)."""
    return np.concatenate([np.reshape(o, (1,) + o.shape) if o.ndim == 0 else o for o in outputs]).astype(np.float64)


def _top1(output: np.ndarray) -> np.ndarray:
    return output.argmax(1) if output.ndim >= 2 and np.issubdtype(output.dtype, np.floating) else output


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    if predictions.shape != labels.shape and predictions.size == labels.size:
        labels = labels.reshape(predictions.shape)
    if predictions.shape != labels.shape:
        raise OnnxPruneError(f"labels have shape {tuple(labels.shape)}, predictions {tuple(predictions.shape)}")
    return float(np.mean(predictions == labels))


def _failures(report: CheckReport, min_agreement: float | None, max_drop: float | None) -> list[str]:
    failures = []
    if min_agreement is not None:
        for out in report.outputs:
            if out.agreement is not None and out.agreement < min_agreement:
                failures.append(f"top-1 agreement {out.agreement:.4f} of output '{out.name}' is below "
                                f"--min-agreement {min_agreement}")
    if max_drop is not None:
        drop = report.accuracy_before - report.accuracy_after
        if drop > max_drop:
            failures.append(f"accuracy drop {drop:.4f} ({report.accuracy_before:.4f} -> "
                            f"{report.accuracy_after:.4f}) is above --max-drop {max_drop}")
    return failures
