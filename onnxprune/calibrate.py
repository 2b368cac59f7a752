"""Calibration data and streaming statistics through onnxruntime.

Readers turn a file or a Python object into feed dicts checked against the model's inputs. `collect_stats` runs the
batches through onnxruntime with the tensors the criteria need exposed as extra outputs, and keeps only per-channel
running sums, so memory does not grow with the number of samples.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .errors import OnnxPruneError, UsageError, first_line
from .graph import inferred_value_infos
from .layers import real_positions
from .verify import NO_NUMPY_TYPES, session
from .verify import first_sample as first_of_batch

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int, or str / None for a run-time size

    @property
    def fixed_batch(self) -> bool:
        return bool(self.dims) and isinstance(self.dims[0], int)

    @property
    def scalar(self) -> bool:
        """A 0-d input: its data holds one value per sample, stacked as (N,), and each run feeds one 0-d value."""
        return not self.dims

    def expected(self) -> str:
        return "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in self.dims) + ")"


def batch_step(specs: list[InputSpec], batch_size: int) -> int:
    """Samples per onnxruntime run: one where the model's batch dimension is fixed at 1 or an input is a scalar (a
    run feeds one 0-d value), else `batch_size`."""
    return 1 if any(s.scalar or (s.fixed_batch and s.dims[0] == 1) for s in specs) else batch_size


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """What each graph input is fed: its dims and numpy dtype (float32 for a bfloat16 input, which numpy cannot
    hold; the session casts it, see verify.numpy_io)."""
    weights = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        t = vi.type.tensor_type
        specs.append(InputSpec(vi.name, fed_dtype(t.elem_type), tuple(_enforced(d) for d in t.shape.dim)))
    return specs


def _enforced(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A dimension as onnxruntime enforces it on a fed array: only a dim_value >= 0 must match exactly; a negative
    one (Paddle's -1) and every dim_param are free, and two axes with the same dim_param ('?' twice, as Paddle
    writes height and width) may differ, so the name is kept for messages only."""
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    return dim.dim_param or None


def fed_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype onnxruntime's Python API takes for a graph input of this ONNX element type."""
    if elem_type in NO_NUMPY_TYPES:
        return np.dtype(np.float32)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def load_arrays(path: str | Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Samples stacked on axis 0, per input: an .npz with arrays named after the inputs (one unnamed array for a
    one-input model; 'label' and friends are ignored), or an .npy for a one-input model."""
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"calibration data not found: {p}")
    if p.suffix not in (".npz", ".npy"):
        raise OnnxPruneError(f"calibration data {p} is not an .npz or .npy file")
    try:
        loaded = np.load(p, allow_pickle=False)
        arrays = {specs[0].name: loaded} if isinstance(loaded, np.ndarray) else dict(loaded)
    except Exception as exc:
        raise OnnxPruneError(f"cannot read calibration data {p}: {first_line(exc)}") from None
    for key in LABEL_KEYS:
        arrays.pop(key, None)
    return arrays_for_inputs(arrays, specs, f"calibration data {p}")


LABEL_KEYS = ("label", "labels", "y")


def arrays_for_inputs(arrays: dict[str, np.ndarray], specs: list[InputSpec], what: str) -> dict[str, np.ndarray]:
    """The array for each graph input, by name; a single array serves a one-input model whatever its name."""
    names = [s.name for s in specs]
    if len(specs) == 1 and names[0] not in arrays and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    for name in names:
        if name not in arrays:
            raise OnnxPruneError(f"{what} has no array for input '{name}' "
                                 f"(has: {', '.join(sorted(arrays)) or 'nothing'})")
    return {n: arrays[n] for n in names}


def array_batches(arrays: dict[str, np.ndarray], specs: list[InputSpec], size: int | None,
                  batch_size: int, first: int = 0) -> Iterator[Feed]:
    """Feed dicts of `batch_size` samples (one at a time where the model's batch dimension is fixed or an input is
    a scalar), from sample `first` on. A scalar input's array holds one value per sample, (N,), fed as a 0-d value;
    a 0-d array is the same value for every sample."""
    total = sample_count(arrays, specs)
    total = min(total, first + size) if size else total
    step = batch_step(specs, batch_size)
    scalars = {s.name for s in specs if s.scalar}
    for start in range(first, total, step):
        yield {n: _samples(a, start, min(start + step, total), n in scalars) for n, a in arrays.items()}


def sample_count(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    """The samples the arrays hold (stacked on axis 0); 1 when every array is a scalar input's 0-d value."""
    scalars = {s.name for s in specs if s.scalar}
    for name, array in arrays.items():
        if np.ndim(array) == 0 and name not in scalars:
            spec = next(s for s in specs if s.name == name)
            raise OnnxPruneError(f"the array for input '{name}' is 0-d; expected samples stacked on axis 0, "
                                 f"shape (N, ...) for an input of shape {spec.expected()}")
    counts = {len(a) for a in arrays.values() if np.ndim(a)}
    if len(counts) > 1:
        raise OnnxPruneError(f"calibration arrays hold different sample counts: {sorted(counts)}")
    return counts.pop() if counts else 1


def _samples(array: np.ndarray, start: int, stop: int, scalar: bool) -> np.ndarray:
    if not scalar:
        return array[start:stop]
    return np.asarray(array if np.ndim(array) == 0 else array[start])  # one 0-d value a run (batch_step is 1)


def reader_batches(reader: object, size: int | None) -> Iterator[Feed]:
    """Batches from an ORT-quantization-style reader (`get_next() -> dict | None`) or an iterable of feed dicts."""
    if hasattr(reader, "get_next"):
        iterator: Iterable = iter(reader.get_next, None)
    elif isinstance(reader, Iterable):
        iterator = reader
    else:
        raise UsageError("calibration data must be a path, an object with get_next(), or an iterable of dicts")
    seen = 0
    for feed in iterator:
        if size and seen >= size:
            return
        yield feed
        seen += batch_length(feed) if isinstance(feed, dict) and feed else 0


def check_feed(feed: Feed, specs: list[InputSpec], first_sample: int = 0) -> Feed:
    """Names, ranks, static sizes, dtypes and finite values of one batch (whose first sample is `first_sample` of
    the data); a one-line error names the input and the expected shape, or the first sample holding NaN or Inf."""
    if not isinstance(feed, dict):
        raise OnnxPruneError(f"calibration batch is a {type(feed).__name__}, expected a dict of input arrays")
    checked = {}
    for spec in specs:
        if spec.name not in feed:
            raise OnnxPruneError(f"calibration batch has no input '{spec.name}' (expected shape {spec.expected()})")
        value = np.asarray(feed[spec.name])
        shape_ok = value.ndim == len(spec.dims) and all(
            not isinstance(d, int) or d == v for d, v in zip(spec.dims, value.shape))
        if not shape_ok:
            raise OnnxPruneError(f"calibration input '{spec.name}' has shape {tuple(value.shape)}, "
                                 f"expected {spec.expected()}")
        if value.dtype != spec.dtype:
            if not (np.issubdtype(value.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)):
                raise OnnxPruneError(f"calibration input '{spec.name}' is {value.dtype}, expected {spec.dtype}")
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf, rejected below
                value = value.astype(spec.dtype)
        checked[spec.name] = value
    return reject_nonfinite(checked, "calibration", first_sample)


def reject_nonfinite(arrays: dict[str, np.ndarray], what: str, first_sample: int = 0) -> dict[str, np.ndarray]:
    """`arrays` (samples on axis 0) unchanged if every floating-point value is finite, else a one-line error naming
    the input and the first sample with a NaN or an Inf (counted from `first_sample`)."""
    for name, value in arrays.items():
        bad = _nonfinite(np.asarray(value))
        if bad is None:
            continue
        per_sample = bad.reshape(len(bad), -1).any(axis=1) if bad.ndim else bad.reshape(1)
        index = int(np.argmax(per_sample))
        sample = np.asarray(value)[index] if bad.ndim else np.asarray(value)
        kind = "NaN" if np.isnan(sample).any() else "Inf"
        raise OnnxPruneError(f"{what} input '{name}' has {kind} at sample {first_sample + index}")
    return arrays


def _nonfinite(value: np.ndarray) -> np.ndarray | None:
    """Where a floating-point array is NaN or Inf; None when it is all finite (or not floating point)."""
    if value.dtype.kind in "biuSUOM":
        return None
    try:
        finite = np.isfinite(value)
    except TypeError:
        return None
    return None if finite.all() else ~finite


def checked_feeds(feeds: Iterable[Feed], specs: list[InputSpec], first: int = 0) -> Iterator[Feed]:
    """`check_feed` on each batch, counting samples (from `first`) so that an error names the first bad sample of
    the data."""
    seen = first
    for feed in feeds:
        checked = check_feed(feed, specs, seen)
        yield checked
        seen += batch_length(checked)


def batch_length(feed: Feed) -> int:
    """Samples in a batch: the first axis of its first input that has one (1 for a batch of scalars)."""
    return next((len(v) for v in feed.values() if np.ndim(v)), 1)


def calibration_batches(source: object, model: onnx.ModelProto, size: int | None = None,
                        batch_size: int = 16, preprocess: "Preprocess | None" = None) -> Iterator[Feed]:
    """Checked feed dicts from a path (.npz / .npy, or a folder of images), a `get_next()` reader, or an iterable
    of dicts, read once (see `Calibration` for data that several steps read)."""
    return Calibration(CalibrationSource(source, size, batch_size, preprocess), model, replayable=False).batches()


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration samples come from: a .npz / .npy path, a folder of images (read as `preprocess` says),
    a `get_next()` reader (onnxruntime.quantization style) or an iterable of feed dicts; at most `size` samples,
    `batch_size` per onnxruntime run. `start` skips the samples before it in a file or folder: a shard of the data
    (see distributed.shard_ranges)."""

    data: object
    size: int | None = None
    batch_size: int = 16
    preprocess: "Preprocess | str | None" = None
    start: int = 0

    @property
    def images(self) -> "Preprocess":
        return self.preprocess if isinstance(self.preprocess, Preprocess) else Preprocess.parse(self.preprocess)

    @property
    def folder(self) -> Path | None:
        data = self.data
        return Path(data) if isinstance(data, (str, os.PathLike)) and Path(data).is_dir() else None


class Calibration:
    """Calibration data opened once and handed to every step that reads it; `batches()` reads from the start each
    time. Arrays are loaded once; a folder of images is read afresh each time (one batch in memory); a Python reader
    is read once and kept when the run reads it several times (`replayable`), else streamed, once."""

    def __init__(self, source: CalibrationSource, model: onnx.ModelProto, replayable: bool):
        self.source, self.specs, self.mask = source, input_specs(model), mask_input(model)
        self.model = model
        self._arrays = self._kept = self._reader = None
        if source.start and not isinstance(source.data, (str, os.PathLike)):
            raise UsageError("a shard of calibration data (a start sample) needs a file or a folder, not a reader")
        if source.folder is None and isinstance(source.data, (str, os.PathLike)):
            self._arrays = load_arrays(source.data, self.specs)
        elif source.folder is None and replayable:
            self._kept = list(checked_feeds(reader_batches(source.data, source.size), self.specs))
        elif source.folder is None:
            self._reader = reader_batches(source.data, source.size)

    def batches(self, size: int | None = None, batch_size: int | None = None) -> Iterator[Feed]:
        """Checked feeds of at most `size` samples (and the source's limit), `batch_size` per run (default the
        source's). A Python reader yields its own batches."""
        size = min(s for s in (size, self.source.size, sys.maxsize) if s)
        batch_size = batch_size or self.source.batch_size
        if self._kept is not None:
            return reader_batches(self._kept, size)
        start = self.source.start
        if self._arrays is not None:
            batches = array_batches(self._arrays, self.specs, size, batch_size, start)
        elif self.source.folder is not None:
            batches = image_batches(self.source.folder, self.specs, size, batch_size, self.source.images, start)
        else:
            batches = self._stream(size)
        return checked_feeds(batches, self.specs, start)

    def _stream(self, size: int) -> Iterator[Feed]:
        reader, self._reader = self._reader, None
        if reader is None:
            raise OnnxPruneError("internal error: a calibration reader was read twice; open it as replayable")
        return reader_batches(reader, size)

    @property
    def samples(self) -> int:
        """How many samples `batches()` yields."""
        return sum(batch_length(feed) for feed in self.batches()) if self._reader is None else 0

    def stored_samples(self) -> int:
        """The samples a file or folder holds (up to the source's `size`), counted without reading them; what
        shards of the data split (see distributed.shard_ranges)."""
        if self._arrays is not None:
            total = sample_count(self._arrays, self.specs)
        elif self.source.folder is not None:
            total = len(image_paths(self.source.folder))
        else:
            raise UsageError("calibration data from a Python reader cannot be split into shards: pass a file")
        return min(total, self.source.size) if self.source.size else total

    @property
    def step(self) -> int:
        """Samples per onnxruntime run; a shard that starts at a multiple of it reads the same batches as one run
        over the whole data."""
        return batch_step(self.specs, self.source.batch_size)

    def first_sample(self) -> Feed | None:
        """The first calibration sample (batch 1 where the model's batch is dynamic)."""
        feed = next(iter(self.batches(1, 1)), None)
        return first_of_batch(self.model, feed) if feed is not None else None


# ------------------------------------------------------------------------------------------------ images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    """How images become the model's input: resize the shorter side, centre-crop, scale, normalise, lay out.
    Without resize and crop, images are resized to the input's static height and width."""

    resize: int | None = None
    crop: int | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    order: str = "RGB"

    @classmethod
    def parse(cls, text: str | None) -> "Preprocess":
        """`resize=256,crop=224,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NCHW,order=RGB,scale=0.00392`."""
        if not text:
            return cls()
        fields: dict = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            try:
                if key in ("resize", "crop"):
                    fields[key] = int(value)
                elif key == "scale":
                    fields[key] = float(value)
                elif key in ("mean", "std"):
                    fields[key] = tuple(float(v) for v in value.split(":"))
                elif key == "layout" and value.upper() in ("NCHW", "NHWC"):
                    fields[key] = value.upper()
                elif key == "order" and value.upper() in ("RGB", "BGR", "L"):
                    fields[key] = value.upper()
                else:
                    raise ValueError
            except ValueError:
                raise UsageError(f"bad --preprocess item '{item}' (keys: resize, crop, scale, mean, std, "
                                 f"layout=NCHW|NHWC, order=RGB|BGR|L)") from None
        return cls(**fields).checked()

    def checked(self) -> "Preprocess":
        """This preprocessing if its values can make an image an input; else a usage error naming the value."""
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UsageError(f"--preprocess {key}={value}: a size must be at least 1 pixel")
        if not np.isfinite(np.array([self.scale, *self.mean, *self.std])).all():
            raise UsageError("--preprocess scale, mean and std must be finite numbers")
        if self.scale == 0:
            raise UsageError("--preprocess scale=0 would make every image the same input")
        if 0 in self.std:
            raise UsageError(f"--preprocess std={':'.join(map(str, self.std))}: a std of 0 divides by zero")
        channels = 1 if self.order == "L" else 3
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in {1, channels}:
                raise UsageError(f"--preprocess {key} has {len(getattr(self, key))} values; order={self.order} "
                                 f"images take {' or '.join(map(str, sorted({1, channels})))}")
        return self


def image_batches(folder: Path, specs: list[InputSpec], size: int | None, batch_size: int,
                  preprocess: Preprocess, first: int = 0) -> Iterator[Feed]:
    """Images of a folder (sorted by name) from the `first` on, read one at a time: memory holds one batch."""
    if len(specs) != 1:
        raise OnnxPruneError(f"a folder of images feeds a one-input model; this one has {len(specs)} inputs")
    paths = image_paths(folder)[first:first + size if size else None]
    if not paths:
        raise OnnxPruneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    spec = specs[0]
    step = batch_step(specs, batch_size)
    for start in range(0, len(paths), step):
        yield {spec.name: np.stack([_image(p, spec, preprocess) for p in paths[start:start + step]])}


def image_paths(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _image(path: Path, spec: InputSpec, pre: Preprocess) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("a folder of images needs Pillow (pip install 'onnxprune[images]')") from None
    try:
        image = Image.open(path).convert("L" if pre.order == "L" else "RGB")
    except Exception as exc:
        raise OnnxPruneError(f"cannot read image {path}: {first_line(exc)}") from None
    image = _resize_and_crop(image, spec, pre)
    array = np.asarray(image, dtype=np.float32) * pre.scale
    array = array[..., None] if array.ndim == 2 else (array[..., ::-1] if pre.order == "BGR" else array)
    array = (array - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1) if pre.layout == "NCHW" else array).astype(spec.dtype)


def _resize_and_crop(image, spec: InputSpec, pre: Preprocess):
    if pre.resize is None and pre.crop is None:
        height, width = (spec.dims[2], spec.dims[3]) if pre.layout == "NCHW" else (spec.dims[1], spec.dims[2])
        if isinstance(height, int) and isinstance(width, int):
            return image.resize((width, height))
        return image
    if pre.resize is not None:
        factor = pre.resize / min(image.size)
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))))
    if pre.crop is not None:
        left, top = (image.width - pre.crop) // 2, (image.height - pre.crop) // 2
        image = image.crop((left, top, left + pre.crop, top + pre.crop))
    return image


# ------------------------------------------------------------------------------------------------ statistics

def mask_input(model: onnx.ModelProto) -> str | None:
    """The graph input that marks a sequence's padding (a 2-D input named like 'attention_mask' or 'input_mask':
    0 at padded positions), or None."""
    inits = {i.name for i in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits and "mask" in vi.name.lower()
             and len(vi.type.tensor_type.shape.dim) == 2]
    return names[0] if len(names) == 1 else None


def padding_of(feed: Feed, mask_name: str | None) -> np.ndarray | None:
    """True at the real (not padded) positions of a batch, (batch, sequence); None without a mask input."""
    return np.asarray(feed[mask_name]) != 0 if mask_name and mask_name in feed else None


def without_padding(model: onnx.ModelProto, feeds: list[Feed]) -> list[Feed]:
    """The same samples, sorted by how far their real positions reach (the padding mask's last non-zero) and batched
    as before, each batch cut to its longest: a model whose padding mask keeps padded positions out of every real
    one gives the same outputs there, at a fraction of the cost (MiniLM's calibration sentences fill 15 of 64
    positions on average). The feeds as they are where that cannot be done: no mask, or an input that shares the
    mask's sequence size is not declared with the same run-time dimension."""
    mask, cut = mask_input(model), sequence_inputs(model)
    if mask not in cut or not feeds or any(set(f) != set(feeds[0]) or f[mask].shape[1] != feeds[0][mask].shape[1]
                                           for f in feeds):
        return feeds
    merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    real = merged[mask] != 0
    reach = np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 1)
    order, step = np.argsort(reach, kind="stable"), len(feeds[0][mask])
    batches = [order[start:start + step] for start in range(0, len(order), step)]
    return [{name: a[rows][:, :reach[rows].max()] if name in cut else a[rows] for name, a in merged.items()}
            for rows in batches]


def sequence_inputs(model: onnx.ModelProto) -> set[str]:
    """The inputs whose axis 1 is the padding mask's run-time sequence dimension (the same dim_param); empty when
    the mask's is fixed or unnamed, or another input of rank >= 2 leaves it open whether it shares it."""
    mask = mask_input(model)
    specs = input_specs(model)
    dims = {s.name: s.dims[1] if len(s.dims) > 1 else None for s in specs}
    if mask is None or not isinstance(dims.get(mask), str):
        return set()
    if any(len(s.dims) > 1 and s.dims[1] is None for s in specs):
        return set()
    return {name for name, dim in dims.items() if dim == dims[mask]}


@dataclass
class ChannelStats:
    """Running per-channel sums of one (tensor, axis): memory is O(channels), whatever the number of samples."""

    count: int = 0  # values seen per channel
    zeros: np.ndarray | None = None
    total: np.ndarray | None = None
    abs_total: np.ndarray | None = None
    squares: np.ndarray | None = None

    def update(self, value: np.ndarray, axis: int, real: np.ndarray | None = None) -> None:
        """Add a batch; with `real` (see padding_of), a channel axis after (batch, sequence) counts real positions
        only."""
        if axis >= 2:
            real_only = real_positions(value, real)
            if real_only is not value:
                value, axis = real_only, axis - 1
        moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as Inf, refused by `finite`
            sums = (np.count_nonzero(moved == 0, axis=1), moved.sum(1), np.abs(moved).sum(1), (moved ** 2).sum(1))
        if self.zeros is None:
            self.zeros, self.total, self.abs_total, self.squares = (np.zeros(len(moved)) for _ in range(4))
        self.zeros += sums[0]
        self.total += sums[1]
        self.abs_total += sums[2]
        self.squares += sums[3]
        self.count += moved.shape[1]

    @property
    def finite(self) -> bool:
        """No sum holds a NaN or an Inf (nothing seen counts as finite)."""
        return self.total is None or all(np.isfinite(s).all() for s in (self.total, self.abs_total, self.squares))

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_total / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        """The sample variance of each channel over the values seen (n - 1 in the denominator), from the streamed
        sums, so it merges like them."""
        mean = self.mean
        return np.maximum(self.squares - self.count * mean ** 2, 0.0) / max(self.count - 1, 1)


@dataclass
class Statistics:
    channels: dict[tuple[str, int], ChannelStats] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # key -> accumulator with `tensors` and `update(outputs)`
    samples: int = 0
    batches: int = 0
    mask: str | None = None  # the input whose zeros marked padding, left out of the statistics


def run_batch(runner, names: list[str], feed: Feed) -> list:
    """`names` computed by an onnxruntime session on one calibration batch; a failure is one line."""
    try:
        return runner.run(names, feed)
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime cannot run the calibration batch: {first_line(exc)}") from None


def collect_stats(model: onnx.ModelProto, probes: set[tuple[str, int]], batches: Iterable[Feed],
                  quiet: bool = True, threads: int = 0, extra: dict | None = None, first: int = 0) -> Statistics:
    """Run `batches` through `model` and accumulate ChannelStats for every probed (tensor, axis), and feed the
    `extra` accumulators (e.g. the regression criterion's Gram matrices) the tensors they ask for. For a model with
    a padding mask input (a transformer's attention_mask), padded positions are left out. `first`: the index of the
    first sample in the whole data (a shard's start), which the accumulators' sampling is seeded by."""
    extra = extra or {}
    tensors = sorted({t for t, _ in probes} | {t for acc in extra.values() for t in acc.tensors})
    probed = with_outputs(model, tensors)
    sess = session(probed, threads=threads)
    names = [o.name for o in probed.graph.output]
    stats = Statistics({p: ChannelStats() for p in probes}, extra)
    progress = Progress(enabled=not quiet)
    stats.mask = mask_input(model)
    for feed in batches:
        outputs = dict(zip(names, run_batch(sess, names, feed)))
        accumulate(stats, outputs, padding_of(feed, stats.mask), first + stats.samples)
        stats.batches += 1
        stats.samples += batch_length(feed)
        progress.show(f"calibrating: {stats.batches} batches, {stats.samples} samples")
    progress.close()
    if stats.batches == 0:
        raise OnnxPruneError("calibration data holds no samples")
    return require_finite_statistics(stats)


def accumulate(stats: Statistics, outputs: dict[str, np.ndarray], real: np.ndarray | None, first: int = 0) -> None:
    """Add one batch (whose first sample is sample `first` of the data) to the statistics; numpy's overflow
    warnings are silenced, since an overflow leaves an Inf that `require_finite_statistics` reports in one line."""
    with np.errstate(over="ignore", invalid="ignore"):
        for (tensor, axis), channel_stats in stats.channels.items():
            channel_stats.update(outputs[tensor], axis, real)
        for accumulator in stats.extra.values():
            accumulator.update(outputs, real, first)


def require_finite_statistics(stats: Statistics) -> Statistics:
    """`stats` if every sum is finite; else a one-line error naming the tensor (finite calibration data can still
    drive a model's activations to Inf or NaN)."""
    bad = [tensor for (tensor, _), channel_stats in stats.channels.items() if not channel_stats.finite]
    bad += [", ".join(acc.tensors) for acc in stats.extra.values()
            if getattr(acc, "gram", None) is not None and not np.isfinite(acc.gram).all()]
    if bad:
        raise OnnxPruneError(f"calibration statistics of '{bad[0]}' are not finite: the model's activations "
                             "overflow or are NaN on the calibration data")
    return stats


class Progress:
    """One self-overwriting line on a terminal's stderr (nothing when stderr is not a terminal), at most five updates
    a second."""

    def __init__(self, enabled: bool):
        self.enabled, self.last, self.shown = enabled and sys.stderr.isatty(), 0.0, False

    def show(self, text: str) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last > 0.2:
            print(f"\r{text}", end="", file=sys.stderr, flush=True)
            self.last, self.shown = now, True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns `tensors`, each declared with its own element type (float16 comes back
    as float16, bfloat16 as float32: see verify.numpy_io); float32 unless the model holds other float types."""
    probed = copy.deepcopy(model)
    existing = {o.name for o in probed.graph.output}
    types = element_types(model) if other_floats(model) else {}
    probed.graph.output.extend(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                               for name in tensors if name not in existing)
    return probed


_OTHER_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def other_floats(model: onnx.ModelProto) -> bool:
    """Whether a weight, graph input or output, or a Cast holds a float type other than float32."""
    g = model.graph
    declared = [vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output)]
    casts = [a.i for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    return any(t in _OTHER_FLOATS for t in [i.data_type for i in g.initializer] + declared + casts)


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor shape inference reaches."""
    infos = inferred_value_infos(model)
    return {name: vi.type.tensor_type.elem_type for name, vi in infos.items() if vi.type.tensor_type.elem_type}
