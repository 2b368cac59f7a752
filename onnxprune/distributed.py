"""Calibration runs: over the whole data in this process, over one shard of it, or in shards on a Dask cluster.

Statistics are sums over samples (see stats_file), so the samples are split into contiguous ranges that start at a
batch boundary (`shard_ranges`), each range's statistics are computed where a worker runs (it opens the model and
its range of the data itself: on a cluster both paths must be readable there), and the client adds them up. A
range that starts at a batch boundary reads the batches one run over the whole data reads, and the regression
criterion's sampling is seeded by a batch's first sample, so the sum equals one run's statistics to float
rounding. Dask is optional (`pip install 'onnxprune[distributed]'`) and imported only when workers are asked for.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import onnx

from .calibrate import Calibration, CalibrationSource
from .errors import OnnxPruneError, UsageError, first_line
from .options import Options, Target, statistics_needed
from .pipeline import Inputs, collect_statistics, prepare
from .stats_file import StatsFile, merge_stats, model_fingerprint

log = logging.getLogger("onnxprune")


@dataclass(frozen=True)
class CalibrationRequest:
    """What a calibration collects, as plain data a worker can be sent: the model's path, the data, the criterion,
    and the options that change what is probed (bias recovery reads channel means; excluded groups are frozen)."""

    model: str | os.PathLike
    source: CalibrationSource
    criterion: str
    recover: str = "none"
    exclude: tuple[str, ...] = ()

    @property
    def reads(self) -> frozenset[str]:
        return statistics_needed(Target.ratio(0.0), Options(criterion=self.criterion, recover=self.recover))

    @property
    def options(self) -> dict:
        """The options that change what is collected, as the file records them."""
        return {"recover": self.recover, "exclude": list(self.exclude), "batch_size": self.source.batch_size}


def calibrate(request: CalibrationRequest, workers: int = 0, scheduler: str | None = None,
              shard: tuple[int, int] | None = None, quiet: bool = True, processes: bool = True) -> StatsFile:
    """The statistics `request` asks for: over the whole data here; over the `shard` (i, n)-th of n ranges (i from
    1); or over `workers` ranges on a Dask cluster, a LocalCluster of `workers` worker processes (threads with
    `processes=False`) unless `scheduler` gives a running cluster's address."""
    if not request.reads:
        raise UsageError(f"criterion {request.criterion} reads no calibration statistics (and --recover "
                         f"{request.recover} none): nothing to calibrate")
    if workers:
        ranges = shard_ranges(*_extent(request), workers)
        names = [f"shard {start}-{stop}" for start, stop in ranges]
        return merge_stats(run_on_dask(request, ranges, scheduler, processes), names)
    if shard is not None:
        return calibrate_range(request, *_one_shard(request, *shard), quiet)
    return calibrate_range(request, None, None, quiet)


def calibrate_range(request: CalibrationRequest, start: int | None, stop: int | None, quiet: bool = True,
                    threads: int = 0) -> StatsFile:
    """The statistics of samples start .. stop (all of them for None), computed in this process: what a worker
    runs. `threads`: onnxruntime's intra-op threads (0: its default)."""
    prepared = prepare(request.model, request.exclude)
    source = request.source if start is None else replace(request.source, start=start, size=stop - start)
    inputs = Inputs(prepared, Calibration(source, prepared.model, replayable=False), None, {})
    stats = collect_statistics(inputs, request.reads, quiet, threads)
    return StatsFile.of(stats, model_fingerprint(prepared.model), request.criterion, request.reads, request.options)


def shard_ranges(total: int, step: int, shards: int) -> list[tuple[int, int]]:
    """`total` samples as at most `shards` contiguous (start, stop) ranges of whole batches of `step` samples, as
    even as whole batches allow; none empty (fewer ranges when there are fewer batches)."""
    batches = -(-total // step)
    shards = max(1, min(shards, batches))
    bounds = [min(total, batches * i // shards * step) for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _extent(request: CalibrationRequest) -> tuple[int, int]:
    """The samples to split and the samples per batch, read from the data and the model's inputs (the weights
    are not loaded)."""
    model = onnx.load(os.fspath(request.model), load_external_data=False)
    calibration = Calibration(request.source, model, replayable=False)
    return calibration.stored_samples(), calibration.step


def _one_shard(request: CalibrationRequest, index: int, count: int) -> tuple[int, int]:
    if not 1 <= index <= count:
        raise UsageError(f"--shard {index}/{count}: the shard number must be between 1 and {count}")
    ranges = shard_ranges(*_extent(request), count)
    if index > len(ranges):
        raise UsageError(f"--shard {index}/{count}: the data holds only {len(ranges)} batches; split it into at "
                         f"most {len(ranges)} shards")
    return ranges[index - 1]


# ------------------------------------------------------------------------------------------------ Dask

def run_on_dask(request: CalibrationRequest, ranges: list[tuple[int, int]], scheduler: str | None,
                processes: bool = True) -> list[StatsFile]:
    """Each range's statistics computed by `calibrate_range` on a Dask worker, in the order of `ranges`. On a
    LocalCluster the machine's cores are shared among the workers' onnxruntime sessions."""
    threads = 0 if scheduler else max(1, (os.cpu_count() or 1) // len(ranges))
    distributed = _dask_distributed()  # first: importing it sets its loggers' levels
    with _dask_logs_quiet(), _client(distributed, scheduler, len(ranges), processes) as client:
        futures = [client.submit(calibrate_range, request, start, stop, True, threads, pure=False)
                   for start, stop in ranges]
        return client.gather(futures)


@contextmanager
def _client(distributed, scheduler: str | None, workers: int, processes: bool) -> Iterator[object]:
    """A Dask client of the cluster at `scheduler`, or of a LocalCluster of `workers` single-threaded workers
    that is closed afterwards."""
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise OnnxPruneError(f"cannot reach the Dask scheduler at {scheduler}: {first_line(exc)}") from None
        with client:
            yield client
        return
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        with distributed.Client(cluster) as client:
            yield client


@contextmanager
def _dask_logs_quiet() -> Iterator[None]:
    """Dask's INFO and WARNING lines (workers registered, a closing worker killed) kept off the CLI's stderr."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dask_distributed():
    try:
        import dask.distributed
    except ImportError:
        raise UsageError("--workers needs Dask distributed: pip install 'onnxprune[distributed]'") from None
    return dask.distributed
