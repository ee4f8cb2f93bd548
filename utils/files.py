"""The project's one way to write files: atomically (a temporary name beside the target, then os.replace), with the
permissions any other new file gets under the process umask. Plus content hashes for cache keys."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Iterator


class WriteError(OSError):
    """A write failed (no space, file-size limit, permissions, read-only disk, ...): names the file and the cause."""


def _is_write_failure(err: BaseException) -> bool:
    """OSError, or what libraries make of one: torch.save's RuntimeError ("PytorchStreamWriter failed writing"),
    safetensors' SafetensorError."""
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def _diagnose(written: Path | None) -> str | None:
    """The likely cause of a library's vague write error: the file-size limit (ulimit -f) reached, or a full disk."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if written is not None and limit != resource.RLIM_INFINITY:
            sizes = [p.stat().st_size for p in ([written] if written.is_file() else written.rglob("*")) if p.is_file()]
            if sizes and max(sizes) >= limit:
                return f"File too large: the file-size limit (ulimit -f) of {limit} bytes was reached"
        stat = os.statvfs(written.parent if written is not None else ".")
        if stat.f_bavail * stat.f_frsize < (1 << 20):
            return "No space left on device"
    except (ImportError, OSError):
        pass
    return None


def _write_error(path: Path, err: BaseException, written: Path | None = None) -> WriteError:
    """One line naming the file and the real cause (libraries wrap ENOSPC/EFBIG in their own messages)."""
    if isinstance(err, OSError) and err.strerror:
        cause = err.strerror
    else:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = _diagnose(written) or f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return WriteError(f"could not write {path} ({cause})")


@contextlib.contextmanager
def _as_write_error(target: Path, written: Path) -> Iterator[None]:
    """Write failures inside the block (whatever a library made of them) become one WriteError naming `target`."""
    try:
        yield
    except WriteError:
        raise
    except BaseException as err:
        if _is_write_failure(err):
            raise _write_error(target, err, written) from err
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything under it) the mode a new file or folder gets under the umask:
    libraries such as safetensors create their files 0600 whatever the umask, which hides outputs from the group."""
    mask = current_umask()
    entries = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


def _temp_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".tmp_{path.name}.{secrets.token_hex(6)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a new empty temporary file beside `path`; on success it replaces `path` atomically, on error it is removed
    and `path` is left as it was. It gets mode 0666 less the umask, whatever the writer did (mkstemp's or safetensors'
    0600 would hide outputs from the group on shared storage)."""
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
        with _as_write_error(path, tmp):
            yield tmp
            follow_umask(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `folder`; on success everything in it gets the umask's modes (0777/0666
    less the umask, `follow_umask`) and it takes `folder`'s place
    (an old folder is moved aside, then removed), on error it is removed and `folder` is left as it was.
    keep_existing: a `folder` that exists by then wins and the new one is dropped (caches that concurrent builders
    fill alike: the rename fails when another builder got there first)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder)
    try:
        os.mkdir(tmp, 0o777)
    except OSError as err:
        raise _write_error(folder, err) from err
    try:
        with _as_write_error(folder, tmp):
            yield tmp
            follow_umask(tmp)
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


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a .safetensors file's JSON header with sorted keys, in place: the library writes its metadata from a
    hash map whose order changes from process to process, so identical runs would differ in their bytes. The tensor
    bytes and their offsets (relative to the header's end) are unchanged; the header stays padded to 8 bytes."""
    path = Path(path)
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + size:])


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders `atomic_path` / `atomic_folder` left under `folder` when their process
    was killed mid-write (call with the folder locked: nobody else is writing). Returns what was removed."""
    found = [p for p in Path(folder).rglob(".tmp_*") if p.exists()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


class FolderBusy(ValueError):
    """Another live process holds the folder's lock; the message names its PID."""


def lock_folder(folder: str | os.PathLike, name: str = ".lock"):
    """An exclusive lock on `folder` (flock on <folder>/<name>, which then holds the holder's PID), held while the
    returned file is open; the kernel drops it when the process dies, SIGKILL included. Child processes started with
    close_fds (subprocess's default) do not inherit it. Raises FolderBusy naming the holder when it is taken."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return open(os.devnull)
    handle = open(folder / name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderBusy(f"{folder} is in use by another process (PID {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


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
