"""Which files an ONNX file keeps its tensors' data in (external data), found without loading the model: the
command line checks, before any work, that no output overwrites one of them (cli._check_files)."""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterator


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX file's tensors keep their data in, read from the protobuf wire format with the weights
    skipped by their length (parsing a 350 MB model just for this took seconds); none for a file that does not
    parse (load_model then says why)."""
    found: set[bytes] = set()
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            _external_locations(buffer, 0, len(buffer), "model", found)
    except (OSError, ValueError, IndexError, RecursionError):
        return []
    return sorted(Path(path).parent / os.fsdecode(location) for location in found)


# Which field of which message holds which message, down to the tensors (as onnx's external_data_helper walks them)
_HOLDS = {"model": {7: "graph", 25: "function"}, "graph": {1: "node", 5: "tensor"}, "function": {7: "node"},
          "node": {5: "attribute"}, "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph"}}
_EXTERNAL_DATA, _DATA_LOCATION = 13, 14  # TensorProto fields; data_location 1 is EXTERNAL


def _external_locations(buffer, start: int, end: int, kind: str, found: set[bytes]) -> None:
    """Adds to `found` the location of every tensor with external data in this message of this kind."""
    location, external = None, False
    for field, wire, first, last in _wire_fields(buffer, start, end):
        held = _HOLDS.get(kind, {}).get(field)
        if held and wire == 2:
            _external_locations(buffer, first, last, held, found)
        elif kind == "tensor" and field == _DATA_LOCATION and wire == 0:
            external = first == 1
        elif kind == "tensor" and field == _EXTERNAL_DATA and wire == 2:
            entry = {f: bytes(buffer[a:b]) for f, w, a, b in _wire_fields(buffer, first, last) if w == 2}
            location = entry.get(2) if entry.get(1) == b"location" else location
    if external and location:
        found.add(location)


def _wire_fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int | None]]:
    """(field number, wire type, start, end) of each length-delimited field; (field, 0, value, None) of a varint."""
    position = start
    while position < end:
        key, position = _varint(buffer, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
            yield field, wire, value, None
        elif wire == 2:
            length, position = _varint(buffer, position)
            if position + length > end:
                raise ValueError("truncated field")
            yield field, wire, position, position + length
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def _varint(buffer, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position
