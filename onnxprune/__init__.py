"""onnxprune: structured (channel) pruning of ONNX models from any framework."""
from .api import analyze, prune, sensitivity
from .calibrate import CalibrationSource
from .errors import OnnxPruneError, UsageError
from .options import Options, Target

__all__ = ["analyze", "prune", "sensitivity", "CalibrationSource", "Options", "Target", "OnnxPruneError",
           "UsageError"]
__version__ = "0.1.0"
