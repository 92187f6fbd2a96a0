"""cachefetch.hashing: the Hash value type, hash_bytes, hash_file, Hasher."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import blake3
import pytest

from cachefetch.hashing import HEX_LENGTH, Hash, Hasher, hash_bytes, hash_file

# BLAKE3 of the empty input, from the BLAKE3 reference test vectors.
EMPTY_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
GOOD_HEX = hashlib.sha256(b"cachefetch").hexdigest()  # any 64 lower-case hex chars


def test_from_hex_accepts_64_lower_case_hex_chars():
    h = Hash.from_hex(GOOD_HEX)
    assert h.hex == GOOD_HEX
    assert HEX_LENGTH == 64


@pytest.mark.parametrize("text", [
    "../",
    "../" + "a" * 61,                     # 64 characters, path traversal
    "a" * 31 + "/" + "a" * 32,            # a slash inside
    "g" * 64,                             # non-hex letter
    GOOD_HEX[:63] + "z",
    GOOD_HEX[:63] + "G",
    GOOD_HEX[:63],                        # 63 chars
    GOOD_HEX + "a",                       # 65 chars
    GOOD_HEX + "\n",                      # trailing newline
    GOOD_HEX[:63] + "\n",                 # newline in place of the last char
    "\n" + GOOD_HEX,
    GOOD_HEX + "\0",                      # NUL appended
    GOOD_HEX[:32] + "\0" + GOOD_HEX[33:],  # NUL inside, still 64 chars
    " " + GOOD_HEX,                       # leading space
    GOOD_HEX + " ",                       # trailing space
    "\t" + GOOD_HEX[1:],
    "",
    "0x" + GOOD_HEX[2:],
    "\u0660" * 64,                        # ARABIC-INDIC DIGIT ZERO: str.isdigit() but not hex
    "\uff41" * 64,                        # FULLWIDTH LATIN SMALL LETTER A
])
def test_from_hex_rejects_everything_but_64_hex_chars(text):
    with pytest.raises(ValueError):
        Hash.from_hex(text)


@pytest.mark.parametrize("value", [GOOD_HEX.encode(), None, 0, bytearray(GOOD_HEX.encode())])
def test_from_hex_rejects_non_str(value):
    with pytest.raises(TypeError):
        Hash.from_hex(value)


def test_from_hex_normalises_upper_case_to_lower():
    upper = Hash.from_hex(GOOD_HEX.upper())
    assert upper.hex == GOOD_HEX
    assert upper == Hash.from_hex(GOOD_HEX)
    assert hash(upper) == hash(Hash.from_hex(GOOD_HEX))


def test_str_is_hex_and_repr_shows_hex():
    h = Hash.from_hex(GOOD_HEX)
    assert str(h) == GOOD_HEX
    assert GOOD_HEX in repr(h)
    assert repr(h).startswith("Hash(")


def test_shard_is_first_two_hex_chars():
    assert Hash.from_hex(GOOD_HEX).shard == GOOD_HEX[:2]
    assert Hash.from_hex("0f" + "0" * 62).shard == "0f"


def test_digest_is_the_32_raw_bytes():
    h = Hash.from_hex(GOOD_HEX)
    assert h.digest == bytes.fromhex(GOOD_HEX)
    assert len(h.digest) == 32
    assert Hash.from_digest(h.digest) == h


@pytest.mark.parametrize("digest", [b"", b"\0" * 31, b"\0" * 33])
def test_from_digest_rejects_other_lengths(digest):
    with pytest.raises(ValueError):
        Hash.from_digest(digest)


def test_hash_is_immutable_and_hashable():
    h = Hash.from_hex(GOOD_HEX)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.digest = b"\0" * 32
    assert {h: 1}[Hash.from_hex(GOOD_HEX.upper())] == 1
    assert len({h, Hash.from_hex(GOOD_HEX), hash_bytes(b"")}) == 2


def test_hash_bytes_matches_reference_vector_and_blake3():
    assert hash_bytes(b"").hex == EMPTY_HEX
    data = os.urandom(5000)
    assert hash_bytes(data).digest == blake3.blake3(data).digest()
    assert hash_bytes(memoryview(data)) == hash_bytes(bytearray(data)) == hash_bytes(data)


def test_hasher_incremental_equals_hash_bytes():
    data = os.urandom(3 * 65536 + 11)
    hasher = Hasher()
    for i in range(0, len(data), 65536):
        hasher.update(data[i:i + 65536])
    assert hasher.size == len(data)
    assert hasher.finalize() == hash_bytes(data)
    assert hasher.finalize() == hash_bytes(data)  # finalize does not reset


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, (3 << 20) + 7])
def test_hash_file_returns_hash_and_size(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    h, n = hash_file(path)
    assert n == size
    assert h == hash_bytes(data)
    assert hash_file(str(path)) == (h, n)


def test_hash_file_missing_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "absent")
