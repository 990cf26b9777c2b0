"""Atomic, durable file operations: every on-disk format of SILO changes through these.

* `write_json_atomic` / `write_bytes_atomic`: write a temp file beside the target, fsync, rename, fsync
  the folder, so a crash leaves the old file or the new one, never half of one;
* `swap_dir_atomic`: move a finished folder into place; an existing one is renamed aside first and only
  deleted after the new one is in place (models, stores and RIC block folders are written this way);
* `fsync_path`, `fsync_tree`: make a file, or a folder and everything under it, durable before a rename
  publishes it;
* `sha256_file`: checksums recorded in manifests and receipts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`): a folder about to be published by a rename
    must be complete on disk first, or a crash right after the rename could expose empty files."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write temp -> fsync -> rename -> fsync folder: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented, key-sorted JSON, written atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def swap_dir_atomic(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest`. An existing `dest` is renamed aside and deleted only
    after `tmp` is in place, so `dest` is always either the old folder or the new one."""
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    if old.exists():
        shutil.rmtree(old)


CRASH_ENV = "SILO_CRASH_AT"


def crash_point(name: str) -> None:
    """Exit the process at once (no cleanup, like a kill) if $SILO_CRASH_AT names this point: the crash
    tests kill real processes at each place where a multi-file change could be torn."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(77)
