"""What a prune run did, as data (JSON) and as the summary the CLI prints."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .groups import Analysis
from .sparsity.step import summary_lines as sparsity_lines


@dataclass
class PruneReport:
    ratio: float | None
    criterion: str
    round_to: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    file_bytes_before: int | None = None  # set when the model came from and went to files (the CLI)
    file_bytes_after: int | None = None
    groups: list[dict] = field(default_factory=list)
    frozen_reasons: list[dict] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    check: dict | None = None  # check.CheckReport.to_dict(): the same schema as `onnxprune check --json`
    plan: object = field(default=None, repr=False)  # the allocate.Plan applied; not part of the JSON
    plan_dict: dict | None = field(default=None, repr=False)  # the plan as written by --plan-out
    recovery: str = "none"
    recovered_layers: int = 0
    calibration_samples: int = 0
    criterion_fallbacks: int = 0  # groups the criterion could not rank (ranked by l1)
    target_latency: dict | None = None  # latency.counts_for_latency: target, predicted and measured fractions
    padding_mask: str | None = None  # the input whose zeros marked padded positions, left out of calibration
    runtime_dims: list[str] = field(default_factory=list, repr=False)  # graph.runtime_dims; not part of the JSON
    sparsity: dict | None = None  # sparsity.step.sparsity_step: zeros per layer, non-zeros before and after
    sparse_storage: dict | None = None  # sparsity.packed.PackReport.to_dict(), with --sparse-storage packed

    @property
    def pruned_groups(self) -> list[dict]:
        return [g for g in self.groups if g["kept"] < g["channels"]]

    @property
    def frozen_groups(self) -> list[dict]:
        return [g for g in self.groups if g["frozen"]]

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k not in ("plan", "plan_dict", "runtime_dims")}
        data["summary"] = {"groups": len(self.groups), "pruned": len(self.pruned_groups),
                           "frozen": len(self.frozen_groups)}
        return data

    def _size_line(self) -> str:
        if self.file_bytes_before is not None and self.file_bytes_after is not None:
            return f"file size   {self.file_bytes_before:>14,} -> {self.file_bytes_after:>14,}  bytes"
        return f"weights     {self.weight_bytes_before:>14,} -> {self.weight_bytes_after:>14,}  bytes"

    def _whole_note(self) -> str:
        whole = len(self.groups) - len(self.pruned_groups) - len(self.frozen_groups)
        why = f"too small for the ratio and --round-to {self.round_to}" if self.ratio is not None else \
            "the MAC or latency budget took nothing from them"
        if self.sparsity and not self.plan.keep:
            why = "channels are not pruned at this granularity"
        return f", {whole} prunable but kept whole ({why})" if whole else ""

    def _macs_line(self) -> str:
        if self.macs_before:
            return f"MACs        {_change(self.macs_before, self.macs_after)}"
        if self.runtime_dims:
            return ("MACs        not counted: the layers' sizes are known only at run time (--calib counts them at "
                    "a sample's)")
        return ("MACs        none counted: no Conv, ConvTranspose, Gemm or MatMul of known sizes (QLinearConv, Einsum "
                "and other ops are not counted)")

    def _groups_line(self) -> str:
        if not self.groups:
            why = ": every path between weights crosses an op that freezes it (below)" if self.barriers else ""
            return "groups      no prunable channel group" + why
        return (f"groups      {len(self.groups)} channel groups: {len(self.pruned_groups)} pruned, "
                f"{len(self.frozen_groups)} frozen" + self._whole_note())

    def summary_lines(self) -> list[str]:
        lines = [f"parameters  {_change(self.params_before, self.params_after)}", self._macs_line(),
                 self._size_line(), self._groups_line()]
        if self.calibration_samples:
            lines.append(f"calibration {self.calibration_samples} samples; criterion {self.criterion}, "
                         f"recovery {self.recovery} ({self.recovered_layers} layers adjusted)" +
                         (f"; positions where '{self.padding_mask}' is 0 left out" if self.padding_mask else ""))
        if self.target_latency:
            t = self.target_latency
            lines.append(f"latency     {t['measured_kept']:.1%} of the original measured here, for a target of "
                         f"{t['target']:.1%} (table: {t['predicted_kept']:.1%}; {t['one_layer_models']} one-layer "
                         f"models measured, {t['threads']} thread(s))")
        for item in self.frozen_reasons[:8]:
            lines.append(f"  frozen: {item['groups']} group(s), {item['channels']} channels - {item['reason']}")
        if not self.groups:
            lines += [f"  barrier: {reason} ({count} node(s))" for reason, count in barrier_counts(self.barriers)[:8]]
        lines += self.sparse_storage["summary"] if self.sparse_storage else []
        return lines + (sparsity_lines(self.sparsity) if self.sparsity else [])


def _change(before: int, after: int) -> str:
    if before == after:
        return f"{before:>14,}  (unchanged)"
    return f"{before:>14,} -> {after:>14,}  ({_ratio(after, before)})"


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} kept" if before else "n/a"


def barrier_counts(barriers: list[str]) -> list[tuple[str, int]]:
    """Barriers ("QuantizeLinear 'q1': no rule for op QuantizeLinear") by reason, most nodes first."""
    return Counter(b.split(": ", 1)[-1] for b in barriers).most_common()


def channel_groups(analysis: Analysis, kept: dict[int, int]) -> list[dict]:
    """The groups a user cares about: those a layer's weights produce or consume, and any other prunable group (an
    Einsum's operands carry no layer role, yet their channels are pruned)."""
    rows = []
    for g in analysis.groups:
        if (g.is_channel_group or g.prunable) and g.size >= 2:
            row = g.to_dict()
            row["kept"] = kept.get(g.id, g.size)
            rows.append(row)
    return rows


def frozen_reasons(rows: list[dict]) -> list[dict]:
    """The first reason of each frozen group, counted, most channels first."""
    groups, channels = Counter(), Counter()
    for row in rows:
        if row["frozen"]:
            groups[row["frozen"][0]] += 1
            channels[row["frozen"][0]] += row["channels"]
    return [{"reason": r, "groups": groups[r], "channels": channels[r]} for r, _ in channels.most_common()]
