"""CAFS: a directory-sharded content-addressable file store.

Layout under ``root``::

    blobs/<shard>/<hex>   committed blobs, named by their BLAKE3-256 hash
    tmp/                  temp files being written; same filesystem as blobs/

A blob appears only by ``rename`` of a complete, fsynced temp file, so a reader
never sees a partial blob and a killed writer leaves at most a temp file.
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from .hashing import Hash, Hasher, hash_file
from .layout import TEMP_PREFIX, StoreLayout

__all__ = ["CAFS", "Blob", "IntegrityError", "BlobNotFound"]

log = logging.getLogger("cachefetch.store")

_COPY_SIZE = 1 << 20


class IntegrityError(ValueError):
    """Content does not hash to the name it was meant to have."""


class BlobNotFound(KeyError, FileNotFoundError):
    """No blob with this hash is in the store.

    Both a ``KeyError`` (a missing key) and a ``FileNotFoundError`` (a missing
    file), so callers can catch whichever their code speaks.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class Blob:
    """A committed blob: its hash and its size in bytes."""

    hash: Hash
    size: int


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require_hash(h: object) -> Hash:
    if not isinstance(h, Hash):
        raise TypeError(f"expected a cachefetch.hashing.Hash, got {type(h).__name__}")
    return h


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class CAFS:
    """A content-addressable file store rooted at ``root``.

    Safe for concurrent use from many threads and processes: every mutation is
    a single ``rename`` or ``unlink``.

    :param root: the store directory; created (with ``blobs/`` and ``tmp/``)
        if missing.
    :param fsync: fsync temp files and directories around each commit. Turn it
        off only for throwaway stores (tests, benchmarks): without it a power
        loss can leave a blob with the right name and wrong content.
    :raises TypeError: if ``root`` is not a path.
    :raises OSError: if the directories cannot be created.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"CAFS root must be a path, not {type(root).__name__}")
        self.layout = StoreLayout.at(root)
        self.root = self.layout.root
        self.blobs_dir = self.layout.blobs_dir
        self.temp_dir = self.layout.temp_dir
        self.fsync = fsync
        #: Called with the hash of each blob :meth:`delete` removed (any thread).
        self.on_delete: list[Callable[[Hash], None]] = []
        os.makedirs(self.blobs_dir, exist_ok=True)
        os.makedirs(self.temp_dir, exist_ok=True)
        self._temp_dev = os.stat(self.temp_dir).st_dev

    def __repr__(self) -> str:
        return f"CAFS({self.root!r})"

    # -- paths -----------------------------------------------------------

    def path(self, h: Hash) -> str:
        """The path a blob with hash ``h`` has (whether or not it exists).

        :raises TypeError: if ``h`` is not a :class:`Hash`.
        """
        return self.layout.blob_path(_require_hash(h))

    def exists(self, h: Hash) -> bool:
        """Whether a blob with hash ``h`` is stored. :raises TypeError: as :meth:`path`."""
        return os.path.isfile(self.path(h))

    __contains__ = exists

    def size(self, h: Hash) -> int:
        """Size in bytes of blob ``h``. :raises BlobNotFound: if absent."""
        try:
            return os.stat(self.path(h)).st_size
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {h.hex} in {self.root}") from None

    def open(self, h: Hash, buffered: bool = True) -> BinaryIO:
        """Open blob ``h`` for reading, binary; unbuffered with ``buffered=False``
        (for ``sendfile`` and single reads, which a buffer only slows down).

        :raises BlobNotFound: if absent.
        """
        try:
            return open(self.path(h), "rb", buffering=-1 if buffered else 0)
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {h.hex} in {self.root}") from None

    def delete(self, h: Hash) -> bool:
        """Remove blob ``h``; returns whether it was there. Never raises for absence.

        Each of :attr:`on_delete` is then called with ``h`` (a fleet withdraws
        this host from the blob's holders); their errors are logged, not raised.
        """
        try:
            os.unlink(self.path(h))
        except FileNotFoundError:
            return False
        for listener in self.on_delete:
            try:
                listener(h)
            except Exception:
                log.exception("a blob-deletion listener failed for %s", h.hex)
        return True

    def __iter__(self) -> Iterator[Hash]:
        """Yield the hash of every stored blob (in no particular order).

        Files whose name is not a valid hash, or that sit in the wrong shard
        directory, are not blobs and are skipped.
        """
        try:
            shards = os.scandir(self.blobs_dir)
        except FileNotFoundError:
            return
        with shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        try:
                            h = Hash.from_hex(entry.name)
                        except ValueError:
                            continue
                        if h.hex == entry.name and h.shard == shard.name and entry.is_file(follow_symlinks=False):
                            yield h

    # -- writing ---------------------------------------------------------

    def new_temp(self, suffix: str = ".tmp") -> tuple[BinaryIO, str]:
        """Create an empty temp file under ``tmp/`` for the caller to fill.

        :returns: ``(file opened "w+b", path)``; pass the path to
            :meth:`commit` once written, or unlink it.
        """
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=self.temp_dir)
        return os.fdopen(fd, "w+b"), path

    def put(self, data: bytes | bytearray | memoryview | BinaryIO) -> Blob:
        """Store ``data`` (bytes, or a binary file read to its end).

        :raises TypeError: if ``data`` is neither bytes-like nor readable.
        :raises OSError: on a write failure (the temp file is removed).
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            chunks: Iterator[bytes | memoryview] = iter((memoryview(data),))
        elif hasattr(data, "read"):
            chunks = iter(lambda: data.read(_COPY_SIZE), b"")
        else:
            raise TypeError(f"put takes bytes or a binary file, not {type(data).__name__}")
        f, tmp = self.new_temp()
        try:
            with f:
                hasher = Hasher()
                for chunk in chunks:
                    if not isinstance(chunk, (bytes, bytearray, memoryview)):
                        raise TypeError("put: the file returned text, not bytes")
                    hasher.update(chunk)
                    f.write(chunk)
            return self.commit(tmp, hasher.finalize(), trusted=True)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def commit(self, tmp_path: str | os.PathLike[str], expected: Hash | None = None,
               *, trusted: bool = False) -> Blob:
        """Move an already-written temp file into the store, consuming it.

        Without ``expected`` the file is hashed to find its name. With it, the
        file is re-hashed and must match; with ``trusted=True`` as well, the
        caller vouches for ``expected`` (it hashed the bytes as it wrote them)
        and the file is renamed without being read again. A file on another
        filesystem is copied into ``tmp/`` (hashed on the way), then renamed.
        If the blob already exists the temp file is just removed.

        :raises IntegrityError: if the content does not hash to ``expected``;
            the temp file is removed.
        :raises ValueError: if ``trusted`` is given without ``expected``.
        :raises TypeError: if ``expected`` is not a :class:`Hash`.
        :raises FileNotFoundError: if ``tmp_path`` does not exist.
        :raises OSError: on a filesystem failure; the temp file is removed.
        """
        if expected is not None:
            _require_hash(expected)
        elif trusted:
            raise ValueError("commit(trusted=True) needs the expected hash")
        tmp = os.fspath(tmp_path)
        st = os.stat(tmp)
        if not os.path.isfile(tmp):
            raise ValueError(f"not a regular file: {tmp}")
        try:
            if st.st_dev != self._temp_dev:
                tmp, actual, size = self._copy_in(tmp)
            elif trusted:
                actual, size = expected, st.st_size
            else:
                actual, size = hash_file(tmp)
            if expected is not None and actual != expected:
                raise IntegrityError(f"content hashes to {actual.hex}, expected {expected.hex}")
            return self._rename_into_place(tmp, actual, size)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _copy_in(self, src: str) -> tuple[str, Hash, int]:
        """Copy ``src`` into ``tmp/`` while hashing; remove ``src``."""
        f, tmp = self.new_temp()
        try:
            hasher = Hasher()
            with f, open(src, "rb") as source:
                while chunk := source.read(_COPY_SIZE):
                    hasher.update(chunk)
                    f.write(chunk)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _unlink_quietly(src)
        return tmp, hasher.finalize(), hasher.size

    def _rename_into_place(self, tmp: str, h: Hash, size: int) -> Blob:
        final = self.path(h)
        if os.path.exists(final):
            try:
                # Fresh again: gc spares young unreferenced blobs, and this one is about to be used.
                os.utime(final)
                _unlink_quietly(tmp)
                return Blob(h, size)
            except FileNotFoundError:
                pass  # removed under us: put ours in its place
        if self.fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # Read-only blobs: a stray writer cannot change content under its name.
        os.chmod(tmp, 0o444)
        shard_dir = os.path.dirname(final)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(shard_dir, exist_ok=True)
            os.rename(tmp, final)
        if self.fsync:
            _fsync_dir(shard_dir)
        return Blob(h, size)

    # -- maintenance -----------------------------------------------------

    def verify(self, remove: bool = False,
               on_blob: Callable[[int, int, int | None], None] | None = None,
               workers: int | None = None) -> list[Hash]:
        """Re-hash every blob; return those whose content does not match their name.

        Blobs are hashed by ``workers`` threads at once (default: one per CPU,
        at most 4): reading and BLAKE3 both release the GIL, so a store is
        verified at about the machine's hashing speed rather than one core's
        read-then-hash. ``on_blob`` runs on the calling thread.

        :param remove: also delete the mismatching blobs.
        :param on_blob: called after each blob as ``on_blob(done, total, size)``;
            ``size`` is ``None`` for a blob deleted while we walked.
        :param workers: hashing threads (>= 1).
        :raises ValueError: if ``workers`` is not a positive int.
        """
        count = workers if workers is not None else min(4, os.cpu_count() or 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        hashes = list(self)

        def check(h: Hash) -> tuple[Hash, Hash | None, int | None]:
            try:
                return (h, *hash_file(self.path(h)))
            except FileNotFoundError:
                return h, None, None  # deleted while we walked

        def checked() -> Iterator[tuple[Hash, Hash | None, int | None]]:
            # A bounded window of futures, in order: a store of a million blobs
            # must not become a million futures at once.
            window: collections.deque = collections.deque()
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="cachefetch-verify") as pool:
                for h in hashes:
                    window.append(pool.submit(check, h))
                    if len(window) >= 4 * count:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()

        bad = []
        for done, (h, actual, size) in enumerate(checked(), 1):
            if on_blob is not None:
                on_blob(done, len(hashes), size)
            if actual is not None and actual != h:
                log.warning("blob %s is corrupt (content hashes to %s)", h.hex, actual.hex)
                bad.append(h)
                if remove:
                    self.delete(h)
        return bad

    def temp_files(self) -> list[str]:
        """Paths of the files now under ``tmp/`` (in-flight or orphaned)."""
        try:
            return sorted(e.path for e in os.scandir(self.temp_dir) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def remove_stale_temps(self, older_than: float = 3600.0) -> list[str]:
        """Delete temp files not modified for ``older_than`` seconds.

        A temp file being written is touched by every write, so only the
        leftovers of killed writers are this old.
        :returns: the removed paths.
        """
        if older_than < 0:
            raise ValueError("older_than must be >= 0")
        cutoff = time.time() - older_than
        removed = []
        for path in self.temp_files():
            try:
                if os.stat(path).st_mtime <= cutoff:
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed
