"""BLAKE3-256 content hashes: the names of everything the store holds.

A :class:`Hash` is the only thing the store ever builds a path from, so its
constructor is strict: exactly 64 hexadecimal characters, nothing around them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import blake3

__all__ = ["Hash", "Hasher", "hash_bytes", "hash_file", "HEX_LENGTH"]

#: Length of a hash in hex characters (BLAKE3 with a 256-bit output).
HEX_LENGTH = 64
_DIGEST_SIZE = 32
# fullmatch with an explicit class: ``$`` would accept a trailing newline.
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Hash:
    """An immutable, hashable BLAKE3-256 digest.

    Build one with :meth:`from_hex`, :meth:`from_digest`, :func:`hash_bytes`,
    :func:`hash_file` or :meth:`Hasher.finalize`. Equality and ``hash()`` are
    those of the 32 digest bytes.

    :raises ValueError: if ``digest`` is not exactly 32 bytes.
    """

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_SIZE:
            raise ValueError(f"a BLAKE3-256 digest is {_DIGEST_SIZE} bytes, got {self.digest!r:.80}")

    @classmethod
    def from_hex(cls, text: str) -> "Hash":
        """Parse 64 hex characters (either case; stored in lower case).

        :raises ValueError: on anything else: other lengths, non-hex
            characters, surrounding whitespace or newlines, NUL bytes.
        :raises TypeError: if ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"Hash.from_hex takes a str, not {type(text).__name__}")
        if not _HEX_RE.fullmatch(text):
            raise ValueError(f"not a BLAKE3-256 hex digest: {text!r:.100}")
        return cls(bytes.fromhex(text))

    @classmethod
    def from_digest(cls, digest: bytes) -> "Hash":
        """Wrap 32 raw digest bytes. :raises ValueError: on another length."""
        return cls(bytes(digest))

    @property
    def hex(self) -> str:
        """The 64 lower-case hex characters."""
        return self.digest.hex()

    @property
    def shard(self) -> str:
        """The first two hex characters: the store's directory for this hash."""
        return self.digest[:1].hex()

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"Hash({self.hex!r})"


class Hasher:
    """An incremental BLAKE3-256 hasher with a byte counter.

    ``update`` accepts any bytes-like object; ``finalize`` may be called more
    than once and does not reset the state.
    """

    __slots__ = ("_hasher", "size")

    def __init__(self) -> None:
        self._hasher = blake3.blake3()
        #: Number of bytes fed so far.
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed ``data``."""
        self._hasher.update(data)
        self.size += len(data)

    def finalize(self) -> Hash:
        """The hash of everything fed so far."""
        return Hash(self._hasher.digest())


def hash_bytes(data: bytes | bytearray | memoryview) -> Hash:
    """The BLAKE3-256 hash of ``data``."""
    return Hash(blake3.blake3(data).digest())


def hash_stream(stream: BinaryIO) -> tuple[Hash, int]:
    """Hash a binary stream from its current position to its end.

    :returns: ``(hash, size in bytes read)``.
    """
    hasher = Hasher()
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view)
        if not n:
            break
        hasher.update(view[:n])
    return hasher.finalize(), hasher.size


def hash_file(path: str | os.PathLike[str]) -> tuple[Hash, int]:
    """Hash the file at ``path``.

    :returns: ``(hash, size)``.
    :raises OSError: if the file cannot be opened or read.
    """
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f)
