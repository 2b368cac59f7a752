"""Per-op rules, one registry entry per op; importing this package registers them all."""
from . import control, conv, elementwise, norm, quant, shape  # noqa: F401  (registration side effects)
from .registry import REGISTRY, Barrier, NodeView, Ref, Rule, rule, rule_for

__all__ = ["REGISTRY", "Barrier", "NodeView", "Ref", "Rule", "rule", "rule_for"]
