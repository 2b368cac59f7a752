"""Per-op rules, one registry entry per op; importing this package registers them all."""
from . import control, conv, elementwise, norm, quant, shape  # noqa: F401  (registration side effects)
from . import compare  # noqa: F401,E402  (comparisons: broadcast, or a one-hot of the input frozen)
from .registry import REGISTRY, Barrier, NodeView, Ref, Rule, rule, rule_for

__all__ = ["REGISTRY", "Barrier", "NodeView", "Ref", "Rule", "rule", "rule_for"]
