"""The project's one way to write files: atomically (a temporary name beside the target, then os.replace), with the
permissions any other new file gets under the process umask. Plus content hashes for cache keys."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


def _temp_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".tmp_{path.name}.{secrets.token_hex(6)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a new empty temporary file beside `path`; on success it replaces `path` atomically, on error it is removed
    and `path` is left as it was. Created with mode 0666, which the kernel reduces by the umask (mkstemp's 0600 would
    hide outputs from the group on shared storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path, suffix or path.suffix)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `folder` (mode 0777 less the umask); on success it takes `folder`'s place
    (an old folder is moved aside, then removed), on error it is removed and `folder` is left as it was.
    keep_existing: a `folder` that exists by then wins and the new one is dropped (caches that concurrent builders
    fill alike: the rename fails when another builder got there first)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, folder)  # refuses to replace a non-empty folder
            except OSError:
                if not folder.is_dir():
                    raise
            return
        old = None
        if folder.exists():
            old = _temp_name(folder, ".old")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def stable_hash(data) -> str:
    """A short hash of JSON-serialisable data (key order independent)."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
