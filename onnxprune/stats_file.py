"""Calibration statistics as a file: what `onnxprune calibrate` writes, `merge-stats` adds up and `--stats` reads.

Every statistic is a float64 sum over samples (per-channel counts, zeros, sums, absolute sums, squares; the
regression criterion's Gram matrices), so statistics of disjoint shards of the data add up to those of the whole
data, in any order. A file (.npz, no pickled objects) holds:

    meta            JSON: format, version, the model's fingerprint, the criterion, statistics kinds and options
                    (--recover, --exclude, --batch-size) it was collected with, samples, batches, the padding mask
                    input, and the key of every array below
    c<i>.<sum>      the sums of probed (tensor, axis) number i: count, zeros, total, abs_total, squares
    g<group id>     the Gram matrix of one channel group

The fingerprint is a hash of the normalised graph (nodes, inputs, outputs) and its weights: statistics are keyed by
tensor names and group ids of that graph, so a file from another model, or another version of it, is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import lazy_tensors
from .calibrate import ChannelStats, Statistics
from .errors import OnnxPruneError, first_line
from .files import write_bytes

FORMAT, VERSION = "onnxprune-stats", 1
SUMS = ("zeros", "total", "abs_total", "squares")  # ChannelStats' float64 sums; `count` is kept in the meta
Space = tuple[str, int]  # a probed (tensor, axis)


@dataclass
class StatsFile:
    """Statistics of one model on some calibration samples, as stored: per probed space its ChannelStats, per group
    its Gram matrix."""

    fingerprint: str
    criterion: str
    reads: tuple[str, ...]  # the kinds of statistics: "channels", "contributions"
    samples: int
    batches: int
    mask: str | None = None
    channels: dict[Space, ChannelStats] = field(default_factory=dict)
    grams: dict[int, np.ndarray] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # what else changes them: recover, exclude, batch_size

    @classmethod
    def of(cls, stats: Statistics, fingerprint: str, criterion: str, reads: frozenset[str],
           options: dict) -> "StatsFile":
        grams = {int(gid): np.asarray(acc.gram, np.float64) for gid, acc in stats.extra.items()}
        return cls(fingerprint, criterion, tuple(sorted(reads)), stats.samples, stats.batches, stats.mask,
                   dict(stats.channels), grams, options)

    def summary(self) -> str:
        return (f"{self.samples} samples, {len(self.channels)} probed tensors, {len(self.grams)} Gram matrices "
                f"(criterion {self.criterion})")


# ------------------------------------------------------------------------------------------------ fingerprint

def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the normalised graph: every node (attributes and subgraphs included), the inputs and outputs, and
    every initializer's name, type, shape and values, read one at a time (lazy_tensors.read: the same whether the
    model's external data was loaded or left on disk). Doc strings and metadata do not count."""
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        stripped = onnx.NodeProto()
        stripped.CopyFrom(node)
        stripped.doc_string = ""
        digest.update(stripped.SerializeToString(deterministic=True))
    for value in list(graph.input) + list(graph.output):
        digest.update(value.name.encode() + value.type.SerializeToString(deterministic=True))
    folder = lazy_tensors.weights_folder(model)
    for tensor in sorted(graph.initializer, key=lambda t: t.name):
        digest.update(f"{tensor.name}\0{tensor.data_type}\0{list(tensor.dims)}".encode())
        digest.update(np.ascontiguousarray(lazy_tensors.read(tensor, folder)).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ write, read

def write_stats(path: str | os.PathLike, stats: StatsFile) -> None:
    """The file, written atomically (files.write_bytes): an interrupted write leaves the old file or none."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(_meta(stats)))}
    for i, channel_stats in enumerate(stats.channels.values()):
        if channel_stats.zeros is not None:
            arrays.update({f"c{i}.{name}": getattr(channel_stats, name) for name in SUMS})
    arrays.update({f"g{gid}": gram for gid, gram in stats.grams.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue(), "statistics file")


def _meta(stats: StatsFile) -> dict:
    channels = [[tensor, axis, cs.count, -1 if cs.zeros is None else len(cs.zeros)]
                for (tensor, axis), cs in stats.channels.items()]
    return {"format": FORMAT, "version": VERSION, "fingerprint": stats.fingerprint, "criterion": stats.criterion,
            "reads": list(stats.reads), "options": stats.options, "samples": stats.samples,
            "batches": stats.batches, "mask": stats.mask,
            "channels": channels, "grams": [[gid, len(gram)] for gid, gram in stats.grams.items()]}


def read_stats(path: str | os.PathLike) -> StatsFile:
    """A statistics file; a one-line error for a missing, truncated or otherwise corrupt one."""
    if not os.path.isfile(path):
        raise OnnxPruneError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise OnnxPruneError(f"statistics file {path} is corrupt: {first_line(exc)}") from None
    try:
        return _parsed(arrays)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise OnnxPruneError(f"statistics file {path} is corrupt: {first_line(exc)}") from None
    except _NotStats as exc:
        raise OnnxPruneError(f"{path} {exc}") from None


class _NotStats(Exception):
    """The file is a readable .npz, but not statistics this version of onnxprune writes."""


def _parsed(arrays: dict[str, np.ndarray]) -> StatsFile:
    if "meta" not in arrays:
        raise _NotStats("is not an onnxprune statistics file (no meta); write one with `onnxprune calibrate`")
    meta = json.loads(str(arrays["meta"]))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise _NotStats(f"is not an onnxprune statistics file of version {VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    channels = {(str(t), int(a)): _channel_stats(arrays, i, int(count), int(size))
                for i, (t, a, count, size) in enumerate(meta["channels"])}
    grams = {int(gid): _array(arrays, f"g{gid}", (int(size), int(size))) for gid, size in meta["grams"]}
    return StatsFile(str(meta["fingerprint"]), str(meta["criterion"]), tuple(meta["reads"]), int(meta["samples"]),
                     int(meta["batches"]), meta["mask"], channels, grams, dict(meta["options"]))


def _channel_stats(arrays: dict[str, np.ndarray], index: int, count: int, size: int) -> ChannelStats:
    if size < 0:
        return ChannelStats(count)
    sums = {name: _array(arrays, f"c{index}.{name}", (size,)) for name in SUMS}
    return ChannelStats(count, **sums)


def _array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of this shape with finite values, else a ValueError naming it."""
    if key not in arrays:
        raise ValueError(f"array '{key}' is missing")
    array = arrays[key]
    if array.dtype != np.float64 or array.shape != shape or not np.isfinite(array).all():
        raise ValueError(f"array '{key}' is not {shape} finite float64 values")
    return array


# ------------------------------------------------------------------------------------------------ merge

def merge_stats(parts: list[StatsFile], names: list[str]) -> StatsFile:
    """The statistics of all the parts' samples: every sum added. Parts of another model (fingerprint), of other
    kinds, or probing other tensors or groups are refused with a one-line error naming the file."""
    total = replace(parts[0], channels=dict(parts[0].channels), grams=dict(parts[0].grams))
    for part, name in zip(parts[1:], names[1:]):
        _require_same(parts[0], part, names[0], name)
        total.channels = {space: _added(cs, part.channels[space]) for space, cs in total.channels.items()}
        total.grams = {gid: gram + part.grams[gid] for gid, gram in total.grams.items()}
        total.samples, total.batches = total.samples + part.samples, total.batches + part.batches
    return total


def _require_same(first: StatsFile, other: StatsFile, first_name: str, name: str) -> None:
    if other.fingerprint != first.fingerprint:
        raise OnnxPruneError(f"{name} holds statistics of another model than {first_name} (fingerprint "
                             f"{other.fingerprint[:12]} vs {first.fingerprint[:12]}); merge files of one model")
    if other.reads != first.reads:
        raise OnnxPruneError(f"{name} holds other statistics ({', '.join(other.reads)}) than {first_name} "
                             f"({', '.join(first.reads)}); calibrate both for the same criterion")
    if _shapes(other) != _shapes(first):
        raise OnnxPruneError(f"{name} probes other tensors or groups than {first_name} (other --exclude or "
                             "--recover?); calibrate both with the same options")


def _shapes(stats: StatsFile) -> tuple[dict, dict]:
    channels = {space: None if cs.zeros is None else len(cs.zeros) for space, cs in stats.channels.items()}
    return channels, {gid: gram.shape for gid, gram in stats.grams.items()}


def _options_text(options: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in options.items()) or "no options"


def _added(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    if a.zeros is None or b.zeros is None:
        return a if b.zeros is None else b
    return ChannelStats(a.count + b.count, *(getattr(a, name) + getattr(b, name) for name in SUMS))


# ------------------------------------------------------------------------------------------------ use

def fill_statistics(path: str | os.PathLike, model: onnx.ModelProto, spaces: set[Space], grams: dict) -> Statistics:
    """Statistics for a prune from a file instead of a calibration pass: the file must be of this (normalised)
    model and hold every probed space in `spaces` and a Gram matrix for every accumulator in `grams` (which get
    them as their `gram`)."""
    stored = read_stats(path)
    if stored.fingerprint != model_fingerprint(model):
        raise OnnxPruneError(f"statistics file {path} was collected on another model (its fingerprint differs); "
                             "run `onnxprune calibrate` on this model")
    missing = [space[0] for space in spaces if space not in stored.channels]
    missing += [f"group {gid}" for gid, acc in grams.items()
                if gid not in stored.grams or stored.grams[gid].shape != acc.gram.shape]
    if missing:
        raise OnnxPruneError(f"statistics file {path} has none for {missing[0]} (collected for criterion "
                             f"{stored.criterion}: {', '.join(stored.reads)}, with {_options_text(stored.options)}); "
                             "calibrate for this criterion, --recover and --exclude")
    for gid, accumulator in grams.items():
        accumulator.gram = stored.grams[gid]
    return Statistics({space: stored.channels[space] for space in spaces}, grams, stored.samples, stored.batches,
                      stored.mask)
