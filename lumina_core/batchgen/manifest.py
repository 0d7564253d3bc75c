"""The manifest of a batch output folder: per-rank JSONL files merged at the end, resume checks, the folder lock.

Why per-rank files rewritten by atomic replace (rather than one shared file appended by all):
appends from several processes (possibly on several nodes over NFS) can interleave or tear a line
when a process is killed mid-write, and NFS does not honour O_APPEND across clients. A file only
one process writes, replaced whole through a temp file + fsync + os.replace, is a valid JSONL file
at every moment, and a kill loses at most the line not yet written (the item being worked on).
Rewriting costs O(items of this rank) per item: a few hundred kB against seconds of sampling.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ..errors import InputError
from ..fileio import atomic_write_text
from .layouts import pairs_index_records

MANIFEST = "manifest.jsonl"
PAIRS_INDEX = "pairs.jsonl"
SUMMARY = "summary.json"
LOCK = "batch.lock"
RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.jsonl$")


def write_jsonl_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSONL atomically (one compact JSON object a line)."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl_records(path: Path) -> list[dict]:
    """Records of a JSONL file; lines that are not JSON objects are skipped (a file edited by hand)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            records.append(record)
    return records


def rank_manifest_path(out_dir: Path, rank: int) -> Path:
    """The manifest file rank ``rank`` writes."""
    return out_dir / f"manifest.rank{rank}.jsonl"


def manifest_files(out_dir: Path) -> list[Path]:
    """The merged manifest and every per-rank manifest present in ``out_dir``."""
    files = [out_dir / MANIFEST] if (out_dir / MANIFEST).is_file() else []
    if out_dir.is_dir():
        files += sorted(p for p in out_dir.iterdir() if RANK_MANIFEST_RE.match(p.name))
    return files


def _prefer(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when ``new`` should replace ``old`` for the same key: a success beats a failure, then the newer."""
    old_ok, new_ok = old.get("status") == "ok", new.get("status") == "ok"
    if old_ok != new_ok:
        return new_ok
    return str(new.get("finished_at", "")) >= str(old.get("finished_at", ""))


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """All records of ``out_dir``'s manifests, one per item key (success over failure, then the newest)."""
    merged: dict[str, dict] = {}
    for path in manifest_files(out_dir):
        for record in read_jsonl_records(path):
            key = record["key"]
            if key not in merged or _prefer(merged[key], record):
                merged[key] = record
    return merged


def merge_manifests(out_dir: Path, layout: str) -> list[dict]:
    """Merge every manifest into ``manifest.jsonl`` (sorted by item index), remove rank files; write pairs index."""
    rank_files = [p for p in manifest_files(out_dir) if p.name != MANIFEST]
    records = sorted(read_manifest(out_dir).values(), key=lambda r: (r.get("index", 0), r["key"]))
    write_jsonl_atomic(out_dir / MANIFEST, records)
    # Only after manifest.jsonl holds their lines; a crash in between leaves duplicates that merge away.
    for path in rank_files:
        path.unlink(missing_ok=True)
    if layout == "pairs":
        write_jsonl_atomic(out_dir / PAIRS_INDEX, pairs_index_records(records))
    return records


def is_done(record: Optional[Mapping[str, Any]], fingerprint: str, out_dir: Path) -> bool:
    """True when the record is a success for the same request and settings and all its files exist."""
    return (record is not None and record.get("status") == "ok" and record.get("fingerprint") == fingerprint
            and all((out_dir / rel).is_file() for rel in record.get("files", ())))


# ---------------------------------------------------------------------------------------------
# The folder lock: one run per output folder
# ---------------------------------------------------------------------------------------------
# Two runs on one folder would both do all the work and rewrite the same rank manifests. Rank 0
# creates the lock file exclusively (O_EXCL, which NFS v3+ honours) and removes it when the run
# ends; a lock whose process is gone from this host is stale and taken over.

def _holder_alive(holder: Mapping[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so it holds
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def acquire_lock(out_dir: Path, command: str = "") -> Path:
    """Take ``out_dir``'s lock for this process, or raise InputError naming the run that holds it."""
    path = out_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict):
                holder = {}
            if holder and not _holder_alive(holder):
                path.unlink(missing_ok=True)  # stale: its process is gone from this host
                continue
            raise InputError(f"output folder {out_dir} is in use by another batch run (pid {holder.get('pid', '?')} "
                             f"on {holder.get('host', '?')} since {holder.get('started', '?')}); wait for it, "
                             f"use another --output, or delete {path} if that run is gone") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return path
    raise InputError(f"could not take the lock {path}: another run keeps taking it")


def release_lock(out_dir: Path) -> None:
    """Remove this process's lock of ``out_dir`` (left alone when another process holds it)."""
    path = out_dir / LOCK
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(holder, dict) and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
