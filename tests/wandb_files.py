"""Reading wandb's offline run files back: what a test asserts wandb was given."""

from __future__ import annotations

import glob
import json
import struct
from collections.abc import Iterator
from pathlib import Path


def wandb_records(path: str) -> Iterator[object]:
    """The records of a wandb run file (.wandb: W&B's LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        if pos + 7 + length > len(raw):  # a record still being written
            return
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Each offline run file in creation order: its run id, group, logged steps and config."""
    runs = []
    for path in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")),
                       key=lambda p: Path(p).stat().st_mtime_ns):
        run = {"id": None, "group": None, "steps": [], "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["group"] = record.run.run_id, record.run.run_group or None
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["steps"].append(record.history.step.num)
        runs.append(run)
    return runs
