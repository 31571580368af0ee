"""Content checksums, stat-keyed memos of them, and the lock that keeps two writers out of one folder.

Digest: a file is cut into 64 MiB chunks; each chunk's blake2b is computed in a thread pool
(hashlib releases the GIL on large buffers, and the chunks are read through ``mmap``, so nothing
is copied), and the file digest is the blake2b of the file size and the chunk digests in order.
Many cores hash one file in parallel, so a check is bound by the disk, not by one core.

Memo: hashing the 90 GB of an original Mixtral on every resume would be slow, so a digest is
remembered together with the file's stat key (size, modification time in ns, inode). A file whose
stat key is unchanged is trusted to hold the remembered content; replacing or rewriting a file
changes its stat key, and then it is hashed again. Resume therefore costs a ``stat`` per file
when nothing changed, and one read of the files that did.

Read-time sums: blake2b runs at about 0.6 GB/s per core, slower than a load reads its files, so a
first load checks a cheaper sum of the bytes it has already read (:func:`fast_digest`): the data as
64-bit words in rows of 4 KiB (a page), the wrapping sum of every row, and a blake2b of those sums
in order (a 512th of the data). Any change to one word changes its row's sum, and a page moved or
swapped changes their order; one pass, at memory speed on every core. It guards against accidental
corruption (disk, copy, a truncated download), which is what a checksum here is for; the explicit
``verify`` keeps blake2b.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..units import MiB
from .errors import CheckpointError

ALGO = "blake2b-64MiB"  # recorded next to the digests, so another scheme can be told apart later
CHUNK = 64 * MiB
DIGEST_SIZE = 32
FAST_ALGO = "rowsum64-4KiB"  # the read-time sums (module docstring)
_ROW = 4096  # bytes per row of the read-time sums


def workers() -> int:
    """Hashing threads: one per core (verification runs before anything else starts), at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def _chunk_digest(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        if length == 0:
            return hashlib.blake2b(b"", digest_size=DIGEST_SIZE).digest()
        # mmap offsets must be page-aligned: CHUNK is a multiple of every page size in use
        with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as m:
            if hasattr(m, "madvise"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(m)
            try:
                return hashlib.blake2b(view, digest_size=DIGEST_SIZE).digest()
            finally:
                view.release()


@dataclass
class DigestRun:
    """What one hashing pass did (for ``verify --time``)."""

    digests: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0


def digest_files(folder: Path, names: Iterable[str], on_file: Callable[[str, str], None] | None = None) -> DigestRun:
    """Digests of ``folder/name`` for every name, all chunks of all files hashed in one thread pool."""
    folder = Path(folder)
    names = list(names)
    t0 = time.perf_counter()
    run = DigestRun()
    sizes = {}
    for name in names:
        try:
            sizes[name] = (folder / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{folder / name} is missing: re-create or re-download the checkpoint") from None
    with ThreadPoolExecutor(workers()) as pool:
        futures = {name: [pool.submit(_chunk_digest, folder / name, a, min(CHUNK, sizes[name] - a))
                          for a in range(0, max(sizes[name], 1), CHUNK)] for name in names}
        for name in names:
            h = hashlib.blake2b(str(sizes[name]).encode(), digest_size=DIGEST_SIZE)
            for fut in futures[name]:
                h.update(fut.result())
            run.digests[name] = h.hexdigest()
            run.bytes += sizes[name]
            if on_file is not None:
                on_file(name, run.digests[name])
    run.seconds = time.perf_counter() - t0
    return run


def blob_digest(blob: Tensor) -> str:
    """Digest of one expert blob in memory (recorded per expert, so a corrupt file can name the expert)."""
    view = blob.contiguous().view(-1).numpy()
    return hashlib.blake2b(view, digest_size=16).hexdigest()


def _sums(data: Tensor, h: "hashlib._Hash") -> None:
    """Feed the row sums of ``data`` (uint8, contiguous, 8-byte aligned) and its tail into ``h``."""
    main = data.numel() // _ROW * _ROW
    if main:
        words = data[:main].view(torch.int64).view(-1, _ROW // 8)
        # integer addition wraps modulo 2**64 in any order, so the sums do not depend on threading
        h.update(words.sum(dim=1).numpy().tobytes())
    h.update(data[main:].numpy().tobytes())


def fast_digest(data: Tensor) -> str:
    """The read-time sum of a tensor's bytes (module docstring): a first load checks each expert blob it
    has just read with this, instead of hashing its file again."""
    flat = data.detach().contiguous().view(-1)
    if flat.device.type != "cpu":
        raise ValueError("fast_digest reads host memory: pass a CPU tensor")
    flat = flat.view(torch.uint8)
    if flat.data_ptr() % 8:
        flat = flat.clone()
    h = hashlib.blake2b(str(flat.numel()).encode(), digest_size=16)
    _sums(flat, h)
    return h.hexdigest()


def fast_file_digest(path: Path) -> str:
    """The read-time sum of a whole file, read in 64 MiB chunks into one reused buffer."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    buf = torch.empty(min(CHUNK, max(size, 1)), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb") as f:
        for _ in range(math.ceil(size / CHUNK)):
            n = f.readinto(view)
            if not n:
                raise CheckpointError(f"{path} became shorter while it was read: copy it again")
            _sums(buf[:n], h)
    return h.hexdigest()


def header_digest(path: Path) -> str:
    """Digest of a safetensors file's length prefix and header (the bytes before its tensor data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        rest = f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
    return bytes_digest(head + rest)


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def stat_key(path: Path) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def atomic_text(text: str, path: Path) -> None:
    """Write ``path`` via a temporary name and a rename: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def memo_digests(folder: Path, names: Iterable[str], memo: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Digests of the files, taken from ``memo`` where a file's stat key is unchanged (module docstring).

    Returns the digests and the updated memo (``{name: {"stat": [...], "digest": ...}}``).
    """
    folder = Path(folder)
    names = list(names)
    out, new_memo, todo = {}, {}, []
    for name in names:
        key = stat_key(folder / name)
        old = memo.get(name) if isinstance(memo, dict) else None
        if isinstance(old, dict) and old.get("stat") == key and isinstance(old.get("digest"), str):
            out[name] = old["digest"]
            new_memo[name] = old
        else:
            todo.append(name)
    if todo:
        run = digest_files(folder, todo)
        for name in todo:
            out[name] = run.digests[name]
            new_memo[name] = {"stat": stat_key(folder / name), "digest": run.digests[name]}
    return out, new_memo


# ---------------------------------------------------------------------------------------------
# folders downloaded from the hub


def _hub_digest(path: Path, etag: str) -> str:
    if len(etag) == 64:  # an LFS file: the etag is the sha256 of its content
        h = hashlib.sha256()
    else:  # a small file kept in git: the etag is its git blob id
        h = hashlib.sha1()
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


HF_DOWNLOAD_META = ".cache/huggingface/download"  # where huggingface_hub records a local_dir download


def hub_expected(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """The hub's digests (etags) of files ``huggingface_hub`` downloaded into ``folder``, where it recorded them
    (``.cache/huggingface/download/<name>.metadata``: commit, etag, time, one per line)."""
    out = {}
    for name in names:
        meta = Path(folder) / HF_DOWNLOAD_META / f"{name}.metadata"
        try:
            lines = meta.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        etag = lines[1].strip().strip('"') if len(lines) > 1 else ""
        if len(etag) in (40, 64) and all(c in "0123456789abcdef" for c in etag):
            out[name] = etag
    return out


def hub_check(folder: Path, expected: dict[str, str]) -> dict[str, bool]:
    """Whether each file's content matches the hub's digest (files hashed in parallel)."""
    with ThreadPoolExecutor(workers()) as pool:
        got = dict(zip(expected, pool.map(lambda n: _hub_digest(Path(folder) / n, expected[n]), expected)))
    return {n: got[n] == expected[n] for n in expected}


# ---------------------------------------------------------------------------------------------
# the writer's lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class FolderLock:
    """An exclusive lock file (created with O_EXCL, holding pid and host) for one writer per folder.

    A lock left by a process that no longer runs (killed, machine rebooted) is taken over with a
    message; one held by a running process is a :class:`CheckpointError` naming it.
    """

    NAME = ".mixtral_nb.lock"

    def __init__(self, folder: Path, what: str = "writing") -> None:
        self.path = Path(folder) / self.NAME
        self.what = what
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": self.what}, f)
        return True

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            try:
                info = json.loads(self.path.read_text())
                pid, host = int(info["pid"]), str(info.get("host", ""))
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (ValueError, KeyError, TypeError, OSError):
                info, pid, host = {}, -1, socket.gethostname()  # unreadable: written by a process killed mid-write
            if host == socket.gethostname() and (pid <= 0 or not _alive(pid)):
                print(f"mixtral_nb: {self.path} was left by process {pid}, which no longer runs; taking it over")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            where = f"process {pid}" + ("" if host == socket.gethostname() else f" on {host}")
            raise CheckpointError(
                f"{self.path.parent} is being written by {where} ({info.get('what', 'writing')}): wait for it to "
                f"finish, or stop it; if that process is gone, delete {self.path}"
            )
        raise CheckpointError(f"could not take the lock {self.path}: another process keeps taking it; run again")

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
