"""Atoms: the index sets that channel spaces are made of, unified as the analysis learns how spaces relate.

Each space class starts as one atom. Relating two atoms (`equate`) lines up their leaves, splitting a leaf where the
other side has a boundary (Concat, Split) and making a leaf an expansion of another (`alias`, Flatten into a linear
layer) where one side is a block of the other. When the analysis is done, every leaf is a group: a set of channels
that must be kept or removed together in every space that contains it.
"""
from __future__ import annotations


class Atoms:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: dict[int, list[int]] = {}  # atom -> the atoms it is the concatenation of
        self.alias: dict[int, tuple[int, int]] = {}  # atom -> (base, k): each base index is k consecutive indices

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def concat(self, atoms: list[int]) -> int:
        whole = self.new(sum(self.size[a] for a in atoms))
        self.parts[whole] = list(atoms)
        return whole

    def expanded(self, base: int, k: int) -> int:
        atom = self.new(self.size[base] * k)
        self.alias[atom] = (base, k)
        return atom

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def leaves(self, a: int, inner: int = 1) -> list[tuple[int, int]]:
        """The leaf atoms of `a` in order, each with its block size."""
        r = self.find(a)
        if r in self.parts:
            return [leaf for p in self.parts[r] for leaf in self.leaves(p, inner)]
        if r in self.alias:
            base, k = self.alias[r]
            return self.leaves(base, inner * k)
        return [(r, inner)]

    def equate(self, a: int, b: int) -> bool:
        """Make `a` and `b` the same index set; False when their structures contradict each other."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if not self._align(self.leaves(ra), self.leaves(rb)):
            return False
        self.parent[rb] = ra
        return True

    def _align(self, left: list[tuple[int, int]], right: list[tuple[int, int]]) -> bool:
        left, right = left[::-1], right[::-1]  # used as stacks, front at the end
        while left and right:
            x, ix = self._next_leaf(left)
            y, iy = self._next_leaf(right)
            fx, fy = self.size[x] * ix, self.size[y] * iy
            if x == y:
                if ix != iy:
                    return False
            elif fx == fy:
                if not self._unify_leaves(x, ix, y, iy):
                    return False
            elif fx < fy:
                if not self._cut(y, iy, fx, right):
                    return False
                left.append((x, ix))
            else:
                if not self._cut(x, ix, fy, left):
                    return False
                right.append((y, iy))
        return not left and not right

    def _next_leaf(self, stack: list[tuple[int, int]]) -> tuple[int, int]:
        """Pop the front leaf, re-expanding entries that earlier steps split or aliased."""
        while True:
            atom, inner = stack.pop()
            expanded = self.leaves(atom, inner)
            if len(expanded) == 1 and expanded[0][0] == atom:
                return atom, inner
            stack.extend(expanded[::-1])

    def _cut(self, leaf: int, inner: int, fine_size: int, stack: list[tuple[int, int]]) -> bool:
        """Split `leaf` so that its first piece covers `fine_size` fine indices, and push it back to be re-read."""
        if fine_size % inner:
            return False  # the boundary falls inside a block
        first = fine_size // inner
        self.parts[leaf] = [self.new(first), self.new(self.size[leaf] - first)]
        stack.append((leaf, inner))
        return True

    def _unify_leaves(self, x: int, ix: int, y: int, iy: int) -> bool:
        if ix == iy:
            self.parent[y] = x
        elif ix % iy == 0:
            self.alias[y] = (x, ix // iy)
        elif iy % ix == 0:
            self.alias[x] = (y, iy // ix)
        else:
            return False
        return True
