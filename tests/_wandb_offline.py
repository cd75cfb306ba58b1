"""Read the records of an offline wandb run (``wandb/offline-run-*/run-*.wandb``).

The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log records in
32 KiB blocks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(run_file: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, out, part = HEADER, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def offline_run(run_dir: Path) -> dict[str, Any]:
    """The single offline run under ``run_dir/wandb``: its exit code (None when the run
    was never finished), summary (last value per key), history records, display name and
    ``define_metric`` records (``{"name", "glob_name", "step_metric"}``). The wandb
    service of this process is torn down first: it writes the run file asynchronously."""
    import wandb

    wandb.teardown()
    runs = list((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    exit_code, summary, history, name, metrics = None, {}, [], None, []
    for rec in records(runs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "exit":
            exit_code = rec.exit.exit_code
        elif kind == "summary":
            for item in rec.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "run":
            name = rec.run.display_name
        elif kind == "metric":
            metrics.append({"name": rec.metric.name, "glob_name": rec.metric.glob_name,
                            "step_metric": rec.metric.step_metric})
        elif kind == "history":
            history.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json)
                            for i in rec.history.item})
    return {"exit_code": exit_code, "summary": summary, "history": history, "name": name,
            "metrics": metrics}
