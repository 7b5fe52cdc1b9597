"""A Weights & Biases run's config and history, for prune_report.py: from an offline run's
`run-<id>.wandb` file, or from the W&B service by ENTITY/PROJECT/RUN_ID.

wandb (0.31 here) no longer ships a Python reader of its run files (`wandb.sdk.internal.datastore`
is gone; `wandb sync` only uploads), so the file's framing is read here: the LevelDB log format
that datastore documented (a 7-byte ":W&B" header, 32 KiB blocks of records, each a CRC-32, a
length, a type FULL / FIRST / MIDDLE / LAST and data), and each record is parsed with wandb's own
protobuf, `wandb.proto.wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import urlparse

from .errors import SubnetscopeError

HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
RUN_ID = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")
REACH_TIMEOUT_S = 5.0
DEFAULT_BASE_URL = "https://api.wandb.ai"


def _payloads(path: Path) -> list[bytes]:
    """The records' bytes, fragments joined; a record a kill cut short at the end is left out."""
    data = path.read_bytes()
    if len(data) < HEADER.size or HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise SubnetscopeError(f"{path} is not a W&B run file (no :W&B header): pass an offline run's run-<id>.wandb")
    out, parts, pos = [], [], HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER.size:  # a block's zero-filled trailer
            pos += room
            continue
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # padding to the block's end
            pos += room
            continue
        body = data[pos + RECORD_HEADER.size: pos + RECORD_HEADER.size + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            break  # the end of a run that was killed while writing
        pos += RECORD_HEADER.size + length
        if kind in (FULL, FIRST):
            parts = [body]
        elif parts:
            parts.append(body)
        if kind in (FULL, LAST) and parts:
            out.append(b"".join(parts))
            parts = []
    return out


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run_file(path: Path) -> dict:
    """{"id", "name", "config", "records"} of one run file; records are the logged steps in order, the
    last value of a step winning (a resumed run logs its rewritten steps again)."""
    from wandb.proto import wandb_internal_pb2

    config: dict = {}
    steps: dict[int, dict] = {}
    run_id = name = None
    for payload in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, name = record.run.run_id, record.run.display_name or None
            config.update({_item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            values = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            step = values.get("_step", record.history.step.num)
            steps[int(step)] = {k: v for k, v in values.items() if not k.startswith("_")}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"id": run_id, "name": name or run_id, "config": config,
            "records": [{"step": s, **v} for s, v in sorted(steps.items())]}


def _run_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("run-*.wandb"), key=lambda f: f.parent.name)  # folder names start with the time


def offline_runs(path: Path) -> list[dict]:
    """The runs in a .wandb file, an offline-run-* folder, or a folder above them (a run folder's
    wandb/): the files of one run id (one per start of a resumed run) merged in time order."""
    files = _run_files(path)
    if not files:
        raise SubnetscopeError(f"--wandb_run {path}: no run-<id>.wandb file in it: pass an offline run folder "
                               "(wandb/offline-run-*) or its .wandb file")
    runs: dict[str, dict] = {}
    for file in files:
        part = read_run_file(file)
        key = part["id"] or file.stem
        if key in runs:
            merged = {r["step"]: r for r in runs[key]["records"] + part["records"]}
            runs[key]["records"] = [merged[s] for s in sorted(merged)]
            runs[key]["config"].update(part["config"])
        else:
            runs[key] = {**part, "folder": file.parent}
    return list(runs.values())


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)


def _reachable(url: str) -> bool:
    """A TCP connection to the service opens within REACH_TIMEOUT_S (name lookup included)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT_S).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=REACH_TIMEOUT_S)
        return True
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def service_run(spec: str) -> dict:
    """A run on the W&B service: refused in one line, within seconds, when the service is out of reach."""
    url = _base_url()
    if not _reachable(url):
        raise SubnetscopeError(f"--wandb_run {spec}: cannot reach the W&B service at {url} (offline?): pass the "
                               "run's offline folder (RUN/wandb/offline-run-*) or its metrics.jsonl folder instead")
    try:
        import wandb

        run = wandb.Api(timeout=30).run(spec)
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        rows = list(run.scan_history())
    except Exception as err:  # wandb's errors (no login, no such run) carry the useful text in their first line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SubnetscopeError(f"--wandb_run {spec}: {first}") from None
    steps = {int(r["_step"]): {k: v for k, v in r.items() if not k.startswith("_") and v is not None} for r in rows}
    return {"id": run.id, "name": run.name or run.id, "config": config, "folder": None,
            "records": [{"step": s, **v} for s, v in sorted(steps.items())]}


def wandb_runs(spec: str) -> list[dict]:
    """The runs `spec` names: a path (offline) or ENTITY/PROJECT/RUN_ID (the service)."""
    path = Path(spec)
    if path.exists():
        return offline_runs(path)
    if RUN_ID.match(spec):
        return [service_run(spec)]
    raise SubnetscopeError(f"--wandb_run {spec}: no such file or folder, and not ENTITY/PROJECT/RUN_ID")
