"""One exception family. The CLI turns these into a one-line message and an exit code."""
from __future__ import annotations


class OnnxPruneError(Exception):
    """A problem with the user's input or environment; exit code 1."""

    exit_code = 1


class UsageError(OnnxPruneError):
    """Invalid options or option combinations; exit code 2."""

    exit_code = 2


class TargetNotMet(OnnxPruneError):
    """The run reached less than its target asked (--strict-target); exit code 3, so a pipeline can tell it from
    a failure."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (protobuf and onnx errors are long)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
