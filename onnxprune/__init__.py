"""onnxprune: structured (channel) pruning of ONNX models from any framework."""
from .api import analyze, prune
from .errors import OnnxPruneError, UsageError

__all__ = ["analyze", "prune", "OnnxPruneError", "UsageError"]
__version__ = "0.1.0"
