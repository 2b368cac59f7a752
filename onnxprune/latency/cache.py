"""Latency measurements kept between runs (`--latency-table`): a JSON file of {"machine": ..., "entries": {key: ms}},
used only on the machine and onnxruntime that measured it."""
from __future__ import annotations

import json
import logging
import os
import platform

from ..errors import UsageError, first_line
from ..files import write_text

log = logging.getLogger("onnxprune")


class LatencyCache:
    """Milliseconds by what the measured model computes (`one_layer.key`); `entries` is filled as layers are
    measured."""

    def __init__(self, entries: dict[str, float] | None = None):
        self.entries: dict[str, float] = entries if entries is not None else {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> float:
        return self.entries[key]

    def __setitem__(self, key: str, ms: float) -> None:
        self.entries[key] = ms

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyCache:
        """Measurements saved by an earlier run, when it ran on this machine with this onnxruntime; otherwise none
        (a table from elsewhere would mislead), with a warning. No file: none."""
        if not os.path.exists(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            origin = data["machine"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"cannot read latency table {path}: {first_line(err)}") from None
        if origin != machine():
            log.warning("latency table %s was measured on another machine or onnxruntime (%s); measuring afresh",
                        path, origin)
            return cls()
        return cls(entries)

    def save(self, path: str | os.PathLike) -> None:
        """Write the measurements atomically (files.write_text: a run stopped midway leaves the old file), for later
        runs here."""
        data = {"machine": machine(), "entries": dict(sorted(self.entries.items()))}
        write_text(path, json.dumps(data, indent=0), "latency table")


def machine() -> str:
    """What a measurement depends on besides the model: the CPU, its count and onnxruntime's version."""
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} cpus; onnxruntime {onnxruntime.__version__}"

