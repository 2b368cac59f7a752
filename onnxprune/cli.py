"""Command line: `onnxprune IN.onnx --ratio 0.5` prunes; `onnxprune analyze IN.onnx` only reports.

The CLI parses options and calls the library. Every error is one line on stderr: exit 2 for usage, 1 otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import onnx

from . import api
from .allocate import ALLOCATIONS
from .calibrate import CalibrationSource, Preprocess
from .criteria import CRITERIA
from .options import DEFAULT_RECIPE_BUDGET, DEFAULT_ROUND_TO, RECIPES, SCHEDULES, Options, Target, validate
from .plan_io import write_plan_dict
from .recover import RECOVERY
from .report import PruneReport, reach_line, target_text
from .sparsity.spec import SPARSE_CRITERIA, parse_pattern
from .sparsity.packed import SPARSE_STORAGES, pack_model
from .sparsity.pattern import SparsityReport, nm_pattern, sparsity_report
from .sparsity.spec import Pattern
from .errors import OnnxPruneError, TargetNotMet, UsageError, first_line
from .files import Named, atomic_path, check_paths, write_text
from .external_data import external_data_files
from .group_types import GROUP_TYPES
from .graph import EXTERNAL_DATA_ABOVE, external_data_path, load_model, save_model
from .check import CheckReport, check as check_models, load_data
from .distributed import CalibrationRequest, calibrate as calibrate_statistics
from .files import same_file
from .stats_file import merge_stats, read_stats, write_stats


class _DefaultToPrune(click.Group):
    """`onnxprune IN.onnx ...` means `onnxprune prune IN.onnx ...`; errors become one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name or "onnxprune", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), 2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except OnnxPruneError as exc:
            _fail(str(exc), exc.exit_code)
        except MemoryError:
            _fail("out of memory", 1)
        except Exception as exc:  # a bug: still one line, and the exit code says failure
            _fail(f"internal error ({type(exc).__name__}): {first_line(exc)}", 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"onnxprune: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


@click.group(cls=_DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
def cli() -> None:
    """Prune channels of an ONNX model: `onnxprune model.onnx --ratio 0.5`."""
    logging.basicConfig(format="onnxprune: %(levelname)s: %(message)s", level=logging.WARNING)


def calibration_options(command):
    """--calib, --calib-size, --batch-size: shared by every command that runs data through the model."""
    command = click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                           help="Calibration samples per onnxruntime run (1 where the model's batch is fixed at 1).")(command)
    command = click.option("--calib-size", type=click.IntRange(min=1), default=None,
                           help="Use at most N calibration samples.")(command)
    command = click.option("--preprocess", metavar="K=V,...",
                           help="For a folder of images: resize=N (shorter side), crop=N (centre), scale=F "
                                "(default 1/255), mean=a:b:c, std=a:b:c, layout=NCHW|NHWC, order=RGB|BGR|L.")(command)
    return click.option("--calib", type=click.Path(path_type=Path),
                        help="Calibration data: .npz with arrays named after the inputs (samples on axis 0), "
                             ".npy for a one-input model, or a folder of images (see --preprocess).")(command)


def check_options(command):
    """Options of the accuracy gate, shared by `check` and `prune --check`."""
    options = [
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
                      help=".npz with arrays named after the inputs (samples on axis 0) and optionally 'label'; "
                           "random inputs when absent."),
        click.option("--labels", help="Labels: an array name in --data or a .npy file."),
        click.option("--min-agreement", type=click.FloatRange(0, 1), help="Fail below this top-1 agreement."),
        click.option("--max-drop", type=click.FloatRange(0, 1), help="Fail when accuracy drops by more (needs labels)."),
        click.option("--latency", is_flag=True, help="Also measure onnxruntime latency before and after."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="onnxruntime intra-op threads for the latency measurement."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_check(original, pruned, data: Path | None, labels: str | None, min_agreement: float | None,
               max_drop: float | None, latency: bool, threads: int) -> CheckReport:
    feeds, found = load_data(data, original, labels) if data else (None, None)
    return check_models(original, pruned, feeds, found, data_name=data.name if data else "random",
                        min_agreement=min_agreement, max_drop=max_drop, latency=latency, threads=threads)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ratio", "-r", type=float, help="Fraction of channels to remove from every group, in [0, 1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: IN.pruned.onnx beside the input).")
@click.option("--target-macs", type=float, help="Instead of --ratio: keep this fraction of the MACs, in (0, 1].")
@click.option("--target-latency", type=float,
              help="Instead of --ratio: keep this fraction of the onnxruntime latency measured on this machine "
                   "(at --threads), in (0, 1].")
@click.option("--target-params", type=float,
              help="With --granularity unstructured, instead of --ratio: keep this fraction of the model's non-zero "
                   "parameters, in (0, 1].")
@click.option("--granularity", default="channel", show_default=True, metavar="channel|unstructured|N:M",
              help="What is removed: channels (physically), single weights (zeroed), or N:M (at most N non-zeros in "
                   "every M consecutive input channels, e.g. 2:4 for sparse tensor cores).")
@click.option("--then", "then", metavar="N:M",
              help="After pruning channels, zero weights in this N:M pattern (e.g. --ratio 0.3 --then 2:4).")
@click.option("--then-criterion", type=click.Choice(SPARSE_CRITERIA), default="l1", show_default=True,
              help="How --then chooses the weights to zero.")
@click.option("--latency-table", type=click.Path(dir_okay=False, path_type=Path),
              help="With --target-latency: keep the per-layer latency measurements in this JSON file and reuse "
                   "them in later runs on this machine.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="uniform: the same ratio in every group; global: one ranking of normalised scores across groups; "
                   "standardised: one ranking of per-group z-scores (FLAP); sensitivity: by measured output damage.")
@click.option("--protect", multiple=True, type=click.Choice(GROUP_TYPES), metavar="TYPE",
              help="Leave whole every group of this type (head, upsample, neck, backbone; see sensitivity --types): "
                   "--protect head keeps a detector's boxes. Repeatable.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="oneshot", show_default=True,
              help="iterative: reach the target in --steps steps of growing ratio, recovering and re-scoring between.")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Steps of --schedule iterative.")
@click.option("--criterion", "-c", type=click.Choice(sorted(set(CRITERIA) | set(SPARSE_CRITERIA))), default="l1",
              show_default=True, help="How channels are ranked (--granularity channel) or weights chosen "
                                      "(unstructured or N:M: l1, wanda or sparsegpt).")
@click.option("--round-to", type=int, default=DEFAULT_ROUND_TO, show_default=True,
              help="Keep a multiple of N channels per group (onnxruntime's CPU convolutions are fastest on multiples of 16).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Freeze groups touching nodes or tensors whose name matches (glob; plain text matches a part).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the kept indices of every pruned weight axis (and of every group) as JSON.")
@click.option("--plan-in", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Remove the channels a --plan-out file lists, instead of choosing by --ratio and --criterion.")
@click.option("--sparse-storage", type=click.Choice(SPARSE_STORAGES), default="dense", show_default=True,
              help="dense: zeros stay in the weights (TensorRT reads 2:4 there); packed: sparse weights are stored as "
                   "kept values plus positions and rebuilt by ONNX nodes that onnxruntime folds when it loads them.")
@click.option("--strict-target", is_flag=True,
              help="Exit 3 and write no model when the result falls short of the target (the report is still "
                   "written); without it, a shortfall is a warning and the report's target.met.")
@click.option("--check", "run_check", is_flag=True,
              help="Compare with the original in onnxruntime after pruning (on --data, else random inputs); "
                   "exit 1 and write nothing when a threshold fails. --data alone also compares.")
@check_options
@click.option("--recover", type=click.Choice(RECOVERY), default="none", show_default=True,
              help="Training-free recovery on the calibration data: bias = fold the removed channels' mean "
                   "contribution into the next layer's bias; lsq = re-fit the next layers by least squares.")
@click.option("--recipe", type=click.Choice(RECIPES), default="fast", show_default=True,
              help="fast: the options as given; accurate (needs --calib): try criterion, allocation and recovery "
                   "candidates on 3/4 of the samples and keep the one that reconstructs the outputs best on the "
                   "rest; a --criterion, --allocation or --recover other than its default is kept fixed.")
@click.option("--recipe-budget", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_RECIPE_BUDGET,
              show_default=True, metavar="SECONDS",
              help="With --recipe accurate: stop trying candidates when the next would pass this time.")
@click.option("--slice", "slice_share", type=float, default=0.0, show_default=True, metavar="F",
              help="Slice this share of a transformer's hidden width first (SliceGPT: norms made RMS norms, the "
                   "residual stream rotated onto its principal directions on --calib, the weakest dropped).")
@calibration_options
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics written by `onnxprune calibrate` (or merge-stats) instead of a calibration pass: they "
                   "serve the criterion's scores and --recover bias; --recover lsq, --allocation sensitivity and a "
                   "data-driven --then-criterion still run the model on --calib.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for the random criterion.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def prune(model: Path, **given: object) -> None:
    """Prune MODEL and write the smaller model."""
    a = PruneArgs(**given)
    target = _target(a.ratio, a.target_macs, a.target_latency, a.plan_in, a.target_params, _own_share(a.granularity))
    options = _prune_options(a)
    validate(target, options)
    output = _checked_output(model, a.output,
                             [("--calib", a.calib), ("--data", a.data), ("--labels", _labels_file(a.labels)),
                              ("--plan-in", a.plan_in), ("--latency-table", a.latency_table), ("--stats", a.stats_path)],
                             [("--report", a.report), ("--plan-out", a.plan_out), ("--latency-table", a.latency_table)])
    original = load_model(model, lazy=a.sparse_storage == "dense")  # weights on disk (packing reads them all)
    if a.data:
        load_data(a.data, original, a.labels)  # bad data fails before the work
    pruned, result = _stored(*api.prune(original, target, options), a.sparse_storage)
    gate = None
    if a.run_check or a.data or a.min_agreement is not None or a.max_drop is not None or a.latency:
        gate = _run_check(original, pruned, a.data, a.labels, a.min_agreement, a.max_drop, a.latency, a.threads)
        result.check = gate.to_dict()
    refused = _refusal(result, gate, a.strict_target)
    if refused is not None:
        _print_summary(result, gate, a.quiet)
        if a.report:
            _write_json(a.report, result.to_dict())
        raise refused
    save_model(pruned, output)
    if a.plan_out:
        write_plan_dict(a.plan_out, result.plan_dict)
    result.file_bytes_before, result.file_bytes_after = _stored_bytes(model), _stored_bytes(output)
    if a.report:
        _write_json(a.report, result.to_dict())
    _print_summary(result, gate, a.quiet)
    if not a.quiet:
        click.echo(f"wrote {output}")


@dataclass(frozen=True)
class PruneArgs:
    """The prune command's options, as click passes them (one field per option, named as its parameter)."""

    ratio: float | None
    target_macs: float | None
    target_latency: float | None
    target_params: float | None
    granularity: str
    then: str | None
    then_criterion: str
    latency_table: Path | None
    allocation: str
    protect: tuple[str, ...]
    schedule: str
    steps: int
    sparse_storage: str
    output: Path | None
    criterion: str
    round_to: int
    exclude: tuple[str, ...]
    report: Path | None
    plan_out: Path | None
    plan_in: Path | None
    strict_target: bool
    run_check: bool
    data: Path | None
    labels: str | None
    min_agreement: float | None
    max_drop: float | None
    latency: bool
    threads: int
    recover: str
    recipe: str
    recipe_budget: float
    slice_share: float
    calib: Path | None
    preprocess: str | None
    calib_size: int | None
    batch_size: int
    stats_path: Path | None
    seed: int
    quiet: bool


def _prune_options(a: PruneArgs) -> Options:
    return Options(criterion=a.criterion, round_to=a.round_to, exclude=a.exclude, seed=a.seed,
                   allocation=a.allocation, recover=a.recover, schedule=a.schedule, steps=a.steps, threads=a.threads,
                   latency_table=a.latency_table, quiet=a.quiet,
                   calib=_calibration(a.calib, a.calib_size, a.batch_size, a.preprocess), recipe=a.recipe,
                   recipe_budget=a.recipe_budget, granularity=a.granularity, then=a.then,
                   then_criterion=a.then_criterion, stats=a.stats_path, slice=a.slice_share,
                   protect=a.protect)


def _refusal(result: PruneReport, gate: CheckReport | None, strict_target: bool) -> OnnxPruneError | None:
    """Why no model is written: a failed check (exit 1), or, with --strict-target, a target not met (exit 3)."""
    if gate is not None and not gate.passed:
        return OnnxPruneError(f"check failed: {gate.failures[0]}; no model written")
    if strict_target and result.target is not None and not result.target["met"]:
        return TargetNotMet(f"target not met: {target_text(result.target)}; no model written")
    return None


def _stored(pruned: onnx.ModelProto, result: PruneReport,
            sparse_storage: str) -> tuple[onnx.ModelProto, PruneReport]:
    """The pruned model as --sparse-storage says (packed: sparse weights as values plus positions, sparsity.packed),
    and the report, which says what packing did."""
    if sparse_storage == "packed":
        pruned, storage = pack_model(pruned)
        result.sparse_storage = storage.to_dict()
    return pruned, result


def _target(ratio: float | None, target_macs: float | None, target_latency: float | None,
            plan_in: Path | None, target_params: float | None = None, own_share: float | None = None) -> Target:
    """The one target the options name, or, for an N:M granularity, its `own_share` of zeros (naming one is then
    refused)."""
    given = [(flag, kind, value) for flag, kind, value in (
        ("--ratio", "ratio", ratio), ("--target-macs", "macs", target_macs),
        ("--target-latency", "latency", target_latency), ("--plan-in", "plan", plan_in),
        ("--target-params", "params", target_params)) if value is not None]
    if own_share is not None:
        if given:
            raise UsageError(f"{given[0][0]} does not go with an N:M --granularity, which sets the share of zeros "
                             "itself; --ratio R --then N:M prunes channels first")
        return Target.ratio(own_share)
    if len(given) != 1:
        raise UsageError("give one of --ratio, --target-macs, --target-latency, --target-params or --plan-in"
                         if not given else
                         f"{' and '.join(flag for flag, _, _ in given)} exclude each other")
    return Target(given[0][1], given[0][2])


def _own_share(granularity: str) -> float | None:
    """The share of zeros an N:M granularity sets itself; None for channel and unstructured."""
    pattern = parse_pattern(granularity)
    return pattern.share if pattern is not None else None


def _calibration(calib: Path | None, size: int | None, batch_size: int,
                 preprocess: str | None) -> CalibrationSource | None:
    return CalibrationSource(calib, size, batch_size, Preprocess.parse(preprocess)) if calib is not None else None


def _print_summary(result, gate: CheckReport | None, quiet: bool) -> None:
    if quiet:
        return
    for line in result.summary_lines() + (gate.summary_lines() if gate else []):
        if not line.startswith("check failed"):
            click.echo(line)


def _check_files(models: list[Named], reads: list[Named], writes: list[Named]) -> None:
    """Before any work, for every command: the input models exist, and no output is a file the run reads (the
    models, their external data, the other inputs) or another output, and each can be written (files.check_paths)."""
    check_paths([named for what, model in models for named in _model_files(what, model)] + reads, writes)


def _checked_output(model: Path, output: Path | None, reads: list[Named], writes: list[Named]) -> Path:
    """prune's output (default IN.pruned.onnx beside the input), once _check_files finds no clash. The external-data
    file save_model writes beside the output counts only if the input has external data or is over 2 GB: pruning
    removes weights."""
    path = output or model.with_name(model.name[:-5] + ".pruned.onnx" if model.name.endswith(".onnx")
                                     else model.name + ".pruned.onnx")
    inputs = _model_files("the input model", model)
    writes = [("-o" if output else "the output", path), *writes]
    if len(inputs) > 1 or sum(os.path.getsize(f) for _, f in inputs if os.path.isfile(f)) > EXTERNAL_DATA_ABOVE:
        writes.append(("the output's external data", external_data_path(path)))
    check_paths(inputs + reads, writes)
    return path


def _stored_bytes(model: Path) -> int:
    """Bytes of a model file and of the external-data files it names."""
    return sum(os.path.getsize(path) for _, path in _model_files("", model) if os.path.isfile(path))


def _model_files(what: str, model: Path) -> list[Named]:
    """An input model and the files its weights are kept in; a missing model is refused here, before any work."""
    if not os.path.exists(model):
        raise OnnxPruneError(f"model not found: {model}")
    if not os.path.isfile(model):
        raise OnnxPruneError(f"not a file: {model}")
    return [(what, model)] + [(f"{what}'s external data", data) for data in external_data_files(model)]


def _labels_file(labels: str | None) -> Path | None:
    """--labels as a file (it may also name an array in --data)."""
    return Path(labels) if labels is not None and os.path.isfile(labels) else None


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Freeze groups touching matching names.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the groups as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every group, not only channel groups.")
@click.option("--pattern", metavar="N:M", help="Also report each layer weight's zeros and whether N:M holds.")
def analyze(model: Path, exclude: tuple[str, ...], json_path: Path | None, show_all: bool,
            pattern: str | None) -> None:
    """Print MODEL's channel groups (what would be pruned together, and what is frozen and why); change nothing."""
    nm = nm_pattern(pattern) if pattern is not None else None
    _check_files([("the input model", model)], [], [("--json", json_path)])
    loaded = load_model(model, lazy=nm is None)  # weights on disk unless the N:M report reads them all
    sparsity = sparsity_report(loaded, nm) if nm is not None else None  # before analyze normalises the model
    analysis = api.analyze(loaded, exclude)
    groups = [g for g in analysis.groups if show_all or (g.is_channel_group and g.size >= 2)]
    for g in groups:
        state = "prunable" if g.prunable else f"frozen: {g.frozen[0]}" if g.frozen else "no weights"
        weights = ", ".join(sorted({m.space[0] for m in g.members if m.constant})[:4])
        extra = f"  [inexact: {g.inexact[0]}]" if g.inexact else ""
        click.echo(f"group {g.id:>4}  {g.size:>5} ch  {state}{extra}\n            weights: {weights}")
    prunable = sum(g.prunable for g in groups)
    click.echo(f"{len(groups)} channel groups: {prunable} prunable, {len(groups) - prunable} frozen")
    click.echo(reach_line(analysis.mac_reach, DEFAULT_ROUND_TO))
    for line in sparsity.summary_lines() if sparsity else []:
        click.echo(line)
    if json_path is not None:
        _write_json(json_path, {"groups": [g.to_dict() for g in groups], "barriers": analysis.barriers,
                                "mac_reach": analysis.mac_reach.to_dict(),
                                **({"sparsity": sparsity.to_dict()} if sparsity else {})})


@cli.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@calibration_options
@click.option("--criterion", "-c", type=click.Choice(sorted(CRITERIA)), default="l1", show_default=True)
@click.option("--round-to", type=int, default=DEFAULT_ROUND_TO, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the curves as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the curves as a PNG (needs matplotlib: pip install 'onnxprune[plot]').")
@click.option("--types", "by_type", is_flag=True,
              help="Instead of per-group curves: each group's type (head, upsample, neck, backbone, read from the "
                   "graph) and the damage of pruning all groups of a type together at 0.25, 0.5 and 0.75.")
def sensitivity_command(model: Path, calib: Path | None, preprocess: str | None, calib_size: int | None,
                        batch_size: int, criterion: str, round_to: int, json_path: Path | None,
                        plot: Path | None, by_type: bool) -> None:
    """Prune each channel group of MODEL alone at several ratios and print how much the outputs change."""
    options = Options(criterion=criterion, round_to=round_to, calib=_calibration(calib, calib_size, batch_size,
                                                                                  preprocess))
    if calib is None:
        raise UsageError("sensitivity needs calibration data (--calib)")
    if by_type and plot is not None:
        raise UsageError("--plot draws the per-group curves, which --types does not measure")
    _check_files([("the input model", model)], [("--calib", calib)], [("--json", json_path), ("--plot", plot)])
    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib (pip install 'onnxprune[plot]')")
    curves = api.sensitivity(load_model(model), options, by_type=by_type)
    if by_type:
        _echo_types(curves)
    for group in [] if by_type else curves["groups"]:
        points = ", ".join(f"{p['kept']}:{p['damage']:.3g}" for p in group["points"]) or "-"
        click.echo(f"group {group['id']:>4} {group['channels']:>5} ch  kept:damage  {points}")
    if json_path is not None:
        _write_json(json_path, curves)
    if plot is not None:
        _plot(curves, plot)


def _echo_types(report: dict) -> None:
    """Each group's type and stride, then per type: groups, channels, and MACs saved : damage at each ratio."""
    for group in report["groups"]:
        stride = f"{group['stride']:g}" if group["stride"] is not None else "?"
        click.echo(f"group {group['id']:>4} {group['channels']:>5} ch  {group['type']:<8} stride {stride:>4}  "
                   f"layers to output {group['layers_to_output']}")
    click.echo("type       groups  channels  ratio:MACs saved:damage")
    for row in report["types"]:
        points = ", ".join(f"{p['ratio']:g}:{p['macs_saved'] / report['macs']:.1%}:{p['damage']:.3g}"
                           for p in row["points"])
        click.echo(f"{row['type']:<10} {row['groups']:>6} {row['channels']:>9}  {points}")


def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5))
    for group in curves["groups"]:
        if group["points"]:
            axes.plot([1 - p["kept"] / p["channels"] for p in group["points"]], [p["damage"] for p in group["points"]],
                      marker="o", label=f"{group['id']} ({group['channels']} ch)")
    axes.set_xlabel("share of the group's channels removed")
    axes.set_ylabel("output damage (relative squared error)")
    axes.set_yscale("log")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    with atomic_path(path, "plot") as tmp:
        figure.savefig(tmp, dpi=120, format="png")


@cli.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The statistics file to write (.npz).")
@click.option("--criterion", "-c", type=click.Choice(sorted(CRITERIA)), required=True,
              help="The criterion the statistics are for (apoz and activation read channel sums, regression Gram "
                   "matrices).")
@click.option("--recover", type=click.Choice(("none", "bias")), default="none", show_default=True,
              help="bias: also the channel means bias recovery reads.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="As when pruning: excluded groups are not probed.")
@calibration_options
@click.option("--workers", type=click.IntRange(min=1),
              help="Split the samples into N shards computed on Dask workers (a local cluster of N processes unless "
                   "--scheduler); needs pip install 'onnxprune[distributed]'.")
@click.option("--scheduler", metavar="ADDRESS",
              help="With --workers: a running Dask scheduler (tcp://HOST:8786); the model and the data must be at "
                   "the same paths on every worker.")
@click.option("--shard", metavar="I/N", help="Only the I-th of N contiguous shards of the samples (merge the N files "
                                            "with merge-stats): a cluster without Dask, such as an array job.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def calibrate_command(model: Path, output: Path, criterion: str, recover: str, exclude: tuple[str, ...],
                      calib: Path | None, preprocess: str | None, calib_size: int | None, batch_size: int,
                      workers: int | None, scheduler: str | None, shard: str | None, quiet: bool) -> None:
    """Write the calibration statistics a criterion reads, to prune with --stats (or merge with merge-stats)."""
    if calib is None:
        raise UsageError("calibrate needs calibration data (--calib)")
    if scheduler is not None and not workers:
        raise UsageError("--scheduler needs --workers N, the number of shards")
    if workers and shard is not None:
        raise UsageError("--shard and --workers exclude each other")
    _check_files([("the input model", model)], [("--calib", calib)], [("-o", output)])
    request = CalibrationRequest(model, _calibration(calib, calib_size, batch_size, preprocess), criterion,
                                 recover, exclude)
    stats = calibrate_statistics(request, workers or 0, scheduler, _shard(shard), quiet)
    write_stats(output, stats)
    if not quiet:
        click.echo(f"wrote {output}: {stats.summary()}")


def _shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/N as (I, N)."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()) or int(count) < 1:
        raise UsageError(f"--shard takes I/N, the I-th of N shards (e.g. 1/4), got '{text}'")
    return int(index), int(count)


@cli.command("merge-stats")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The merged statistics file.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def merge_stats_command(files: tuple[Path, ...], output: Path, quiet: bool) -> None:
    """Add up statistics files of one model (computed on disjoint shards of its calibration data) into one."""
    if len(files) < 2:
        raise UsageError("merge-stats adds up two or more statistics files")
    for index, first in enumerate(files):
        twice = next((other for other in files[index + 1:] if same_file(first, other)), None)
        if twice is not None:
            raise UsageError(f"{first} and {twice} are the same file: its samples would count twice")
    check_paths([("a statistics file to merge", f) for f in files], [("-o", output)])
    merged = merge_stats([read_stats(f) for f in files], [str(f) for f in files])
    write_stats(output, merged)
    if not quiet:
        click.echo(f"wrote {output}: {merged.summary()}, from {len(files)} files")


@cli.command("check")
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("pruned", type=click.Path(dir_okay=False, path_type=Path), required=False)
@check_options
@click.option("--pattern", metavar="N:M",
              help="Verify that every layer weight of PRUNED (or of the one model given) holds at most N non-zeros in "
                   "every M consecutive input channels; print its zeros per layer and the MACs a 2:4 engine could "
                   "skip. Exit 1 where it does not hold.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
def check_command(original: Path, pruned: Path | None, data: Path | None, labels: str | None,
                  min_agreement: float | None, max_drop: float | None, latency: bool, threads: int,
                  pattern: str | None, json_path: Path | None) -> None:
    """Compare PRUNED with ORIGINAL in onnxruntime; exit 0 within the thresholds, 1 when one fails.
    `check MODEL --pattern 2:4` verifies one model's sparsity pattern."""
    nm = nm_pattern(pattern) if pattern is not None else None
    comparing = data or labels or min_agreement is not None or max_drop is not None or latency
    if pruned is None and (nm is None or comparing):
        raise UsageError("check compares two models, ORIGINAL PRUNED; one model alone takes --pattern N:M")
    models = [("the original model", original)] + ([("the pruned model", pruned)] if pruned else [])
    _check_files(models, [("--data", data), ("--labels", _labels_file(labels))], [("--json", json_path)])
    result, failures = {}, []
    if pruned is not None:
        gate = _compare_files(original, pruned, data, labels, min_agreement, max_drop, latency, threads)
        result, failures = gate.to_dict(), list(gate.failures)
    if nm is not None:
        sparsity = _print_sparsity(load_model(pruned or original), nm)
        result["sparsity"] = sparsity.to_dict()
        failures += sparsity.failure_lines()
    result.update(failures=failures, passed=not failures)
    if json_path is not None:
        _write_json(json_path, result)
    if failures:
        raise OnnxPruneError(f"check failed: {failures[0]}")


def _compare_files(original: Path, pruned: Path, data: Path | None, labels: str | None, min_agreement: float | None,
                   max_drop: float | None, latency: bool, threads: int) -> CheckReport:
    """Run both models on the data and print what the accuracy gate found."""
    gate = _run_check(load_model(original, lazy=True), load_model(pruned, lazy=True), data, labels, min_agreement,
                      max_drop, latency, threads)  # onnxruntime reads external weights from their files
    for line in gate.summary_lines():
        if not line.startswith("check failed"):
            click.echo(line)
    model = gate.model
    click.echo(f"parameters {model['params'][0]:,} -> {model['params'][1]:,}; MACs {model['macs'][0]:,} -> "
               f"{model['macs'][1]:,}; files {original.stat().st_size:,} -> {pruned.stat().st_size:,} bytes")
    return gate


def _print_sparsity(model: onnx.ModelProto, pattern: Pattern) -> SparsityReport:
    """The model's sparsity per layer against an N:M pattern (packed weights read back), printed."""
    sparsity = sparsity_report(model, pattern)
    for line in sparsity.summary_lines():
        click.echo(line)
    return sparsity


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
