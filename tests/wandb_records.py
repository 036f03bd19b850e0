"""Read the history records of an offline W&B run (its ``run-*.wandb`` transaction log).

The file is a ``:W&B`` header (7 bytes) followed by a LevelDB-style log: 32 KiB blocks of
chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a
serialised ``wandb_internal_pb2.Record``. Used by the tests to see which step W&B stored for each
logged key, without the network.
"""

from __future__ import annotations

import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7


def history_rows(path: str | Path) -> list[dict[str, str]]:
    """Every history record of the run as ``{key: value_json}`` (nested keys joined by ``/``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, chunks, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too short for a chunk header
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            chunks = chunk
        elif kind == 3:
            chunks += chunk
        elif kind == 4:
            records.append(chunks + chunk)
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item})
    return rows
