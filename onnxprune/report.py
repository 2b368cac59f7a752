"""What a prune run did, as data (JSON) and as the summary the CLI prints."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .allocate import TARGET_TOLERANCE, MacReach
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
    mac_reach: MacReach | None = None  # MACs in prunable groups and the reachable minimum (JSON: its to_dict())
    target: dict | None = None  # target_outcome: asked and reached, met or not and why
    sparsity: dict | None = None  # sparsity.step.sparsity_step: zeros per layer, non-zeros before and after
    sparse_storage: dict | None = None  # sparsity.packed.PackReport.to_dict(), with --sparse-storage packed
    recipe: dict | None = None  # recipe.run_recipe, with --recipe accurate: candidates tried, chosen, why
    slicing: str | None = None  # with --slice: the hidden width before and after, or why it was not sliced

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
        data["mac_reach"] = self.mac_reach.to_dict() if self.mac_reach is not None else None
        return data

    def _size_line(self) -> str:
        if self.file_bytes_before is not None and self.file_bytes_after is not None:
            return f"file size   {self.file_bytes_before:>14,} -> {self.file_bytes_after:>14,}  bytes"
        return f"weights     {self.weight_bytes_before:>14,} -> {self.weight_bytes_after:>14,}  bytes"

    def _whole_note(self) -> str:
        whole = len(self.groups) - len(self.pruned_groups) - len(self.frozen_groups)
        why = "the ratio removes less than one channel from them" if self.ratio is not None else \
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
        if self.recipe:
            lines.append(recipe_line(self.recipe))
        if self.slicing:
            lines.append(f"slicing     {self.slicing}")
        if self.target_latency:
            t = self.target_latency
            lines.append(f"latency     {t['measured_kept']:.1%} of the original measured here, for a target of "
                         f"{t['target']:.1%} (table: {t['predicted_kept']:.1%}; {t['one_layer_models']} one-layer "
                         f"models measured, {t['threads']} thread(s))")
        if self.target is not None and not self.target["met"]:
            lines.append(f"target      NOT MET: {target_text(self.target)}")
        for item in self.frozen_reasons[:8]:
            lines.append(f"  frozen: {item['groups']} group(s), {item['channels']} channels - {item['reason']}")
        if not self.groups:
            lines += [f"  barrier: {reason} ({count} node(s))" for reason, count in barrier_counts(self.barriers)[:8]]
        lines += self.sparse_storage["summary"] if self.sparse_storage else []
        return lines + (sparsity_lines(self.sparsity) if self.sparsity else [])


def recipe_line(recipe: dict) -> str:
    """'recipe      accurate: regression/uniform/lsq of 7 tried in 12 s (lowest relative output error ...)'."""
    chosen, tried = recipe["chosen"], recipe["candidates"]
    sliced = f"/slice {chosen['slice']:g}" if chosen.get("slice") else ""
    return (f"recipe      {recipe['name']}: {chosen['criterion']}/{chosen['allocation']}/{chosen['recover']}{sliced} "
            f"of {len(tried)} tried in {sum(t['seconds'] for t in tried):.0f} s ({recipe['why']})")


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


# What each kind of target is a fraction of: channels removed (a ratio), or MACs / latency kept.
_TARGET_WHAT = {"ratio": "of the prunable groups' channels removed", "macs": "of the MACs kept",
                "latency": "of the latency kept"}


def target_outcome(report: PruneReport, kind: str, asked: object) -> dict | None:
    """The target asked and what the run reached: for a ratio, the share of the prunable groups' channels removed;
    for a MAC or latency target, the fraction kept. `met` unless it falls short by more than TARGET_TOLERANCE (or
    nothing could be counted), with the reason. None for a plan, which names its channels."""
    if kind not in _TARGET_WHAT:
        return None
    reached = _reached(report, kind)
    short = reached is None or (asked - reached if kind == "ratio" else reached - asked) > TARGET_TOLERANCE
    return {"kind": kind, "asked": float(asked), "reached": reached, "met": not short,
            "reason": _shortfall(report, kind, float(asked)) if short else None}


def target_text(outcome: dict) -> str:
    """'91.0% of the MACs kept for a target of 50.0% (only 9% of the MACs ...)'."""
    reached = "n/a" if outcome["reached"] is None else f"{outcome['reached']:.1%}"
    return (f"{reached} {_TARGET_WHAT[outcome['kind']]} for a target of {outcome['asked']:.1%}"
            + (f" ({outcome['reason']})" if outcome["reason"] else ""))


def unreachable_reason(budget: float, reach: MacReach) -> str:
    """Why a MAC target below the reachable minimum is not met, and what was done instead."""
    return (f"{reach.share:.0%} of the MACs are in prunable groups, and with every prunable group at its floor "
            f"{reach.minimum:.1%} remain (the reachable minimum); no group loses more than {1 - budget:.0%} of its "
            "channels instead")


def reach_line(reach: MacReach, round_to: int) -> str:
    """'prunable MACs: 83% (of 1.82 GMAC); 41% left with every prunable group at its floor (--round-to 16)'."""
    if not reach.total:
        return "prunable MACs: none counted (no Conv, ConvTranspose, Gemm or MatMul of sizes known before run time)"
    return (f"prunable MACs: {reach.share:.0%} (of {_macs_text(reach.total)}); {reach.minimum:.0%} left with every "
            f"prunable group at its floor (--round-to {round_to})")


def _macs_text(macs: float) -> str:
    return f"{macs / 1e9:.2f} GMAC" if macs >= 1e9 else f"{macs / 1e6:.2f} MMAC" if macs >= 1e6 else f"{macs:,.0f} MAC"


def _reached(report: PruneReport, kind: str) -> float | None:
    if kind == "ratio":
        rows = [g for g in report.groups if g["prunable"]]
        total = sum(g["channels"] for g in rows)
        return 1 - sum(g["kept"] for g in rows) / total if total else 0.0
    if kind == "macs":
        return report.macs_after / report.macs_before if report.macs_before else None
    return report.target_latency["measured_kept"] if report.target_latency else None


def _shortfall(report: PruneReport, kind: str, asked: float) -> str:
    reach = report.mac_reach
    if kind == "ratio":
        rows = [g for g in report.groups if g["prunable"]]
        if not rows:
            return "no prunable channel group"
        floored = sum(g["kept"] > g["channels"] - round(asked * g["channels"]) for g in rows)
        return (f"{floored} of {len(rows)} prunable groups keep more channels than the ratio asks: each keeps at "
                f"least one block of up to --round-to {report.round_to} channels")
    if report.macs_before == 0 and kind == "macs":
        return "no MACs counted"
    if kind == "macs" and reach is not None and not reach.can_meet(asked):
        return unreachable_reason(asked, reach)
    share = f"{reach.share:.0%} of the MACs are in prunable groups" if reach is not None else ""
    if kind == "latency" and report.target_latency:
        return f"the latency table predicted {report.target_latency['predicted_kept']:.1%}; " + share
    return f"the channel counts rounding allows (--round-to {report.round_to}) come no closer; " + share
