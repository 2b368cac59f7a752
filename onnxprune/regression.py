"""The regression criterion (ThiNet-style): which channels can go with the least reconstruction error of the layers
that consume them.

For every consumer layer, the output it computes is a sum of per-channel contributions z_c (a channel's inputs times
its weights). Removing a set S changes the output by the sum of z_c over S, so the squared error is 1_S' H 1_S with
H = E[z z'] over sampled positions and output channels. `ContributionGram` accumulates H while calibration data
streams through; `removal_order` removes channels greedily, each time the one that adds the least error.
"""
from __future__ import annotations

import numpy as np

from .groups import Group, Member
from .layers import Layer

_OUTPUTS_PER_ROW = 8  # output channels sampled per position, as ThiNet does


class ContributionGram:
    """H = sum of z z' for one group over all its consumer layers; memory: channels^2."""

    def __init__(self, group: Group, consumers: list[tuple[Layer, Member, np.ndarray]], positions: int = 16):
        self.group = group
        self.consumers = consumers  # (re-fittable layer, its data input member, its weight)
        self.tensors = sorted({m.space[0] for _, m, _ in consumers})
        self.gram = np.zeros((group.size, group.size))
        self.positions = positions

    def update(self, outputs: dict[str, np.ndarray], real: np.ndarray | None = None, first: int = 0) -> None:
        """Add one batch whose first sample is sample `first` of the data. The positions are drawn from a generator
        seeded by the group and `first`, so shards of the data that start at a batch boundary draw what one run over
        the whole data draws, and their Gram matrices add up to its (see stats_file)."""
        rng = np.random.default_rng([self.group.id, first])
        for layer, member, weight in self.consumers:
            z = self._contributions(layer, member, weight, outputs[member.space[0]], real, rng)
            self.gram += z.T @ z

    def _contributions(self, layer: Layer, member: Member, weight: np.ndarray, x: np.ndarray,
                       real: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        """(samples, channels): each sampled (position, output) split into the group's channels' contributions."""
        idx = member.offset + np.arange(self.group.size * member.inner)
        patches = layer.sample(x, rng, self.positions, real).patches[:, idx]  # (rows, ci, kernel...)
        kernels = layer.kernels(weight)[:, idx] * layer.alpha  # (O, ci, kernel...)
        outputs = rng.integers(0, len(kernels), (len(patches), _OUTPUTS_PER_ROW))
        taps = "klmnopq"[:patches.ndim - 2]  # kernel axes, none for a matrix layer
        z = np.einsum(f"rc{taps},rsc{taps}->rsc", patches, kernels[outputs]).reshape(-1, len(idx))
        return z.reshape(len(z), self.group.size, member.inner).sum(2).astype(np.float64)


def removal_order(gram: np.ndarray) -> np.ndarray:
    """Scores in the greedy removal order, the channel removed first lowest. Each score is the reconstruction error
    once that channel and all removed before it are gone (kept non-decreasing, with the order breaking ties), so
    that the scores of different groups compare by damage, not only by rank (global allocation reads them)."""
    size = len(gram)
    removed = np.zeros(size, bool)
    cross = np.zeros(size)  # H[:, S].sum(1) for the removed set S
    scores = np.zeros(size)
    error = floor = 0.0
    tie = 1e-9 * (float(np.trace(gram)) / max(size, 1) or 1.0)
    for step in range(size):
        cost = np.where(removed, np.inf, np.diag(gram) + 2 * cross)
        channel = int(np.argmin(cost))
        removed[channel] = True
        cross += gram[:, channel]
        error += float(cost[channel])
        floor = max(floor, error)
        scores[channel] = floor + step * tie
    return scores
