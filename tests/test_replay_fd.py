"""cachefetch.replay.fd_body: a bare descriptor as a WSGI body, with and
without the server's ``wsgi.file_wrapper``, on real files."""
from __future__ import annotations

import os

import pytest

from cachefetch.replay import fd_body

DATA = bytes(range(256)) * 1000  # 256,000 bytes, no two neighbouring blocks alike


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(DATA)
    return str(p)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_without_a_file_wrapper_it_yields_length_bytes_from_the_position_then_closes(path):
    fd = os.open(path, os.O_RDONLY)
    os.lseek(fd, 1000, os.SEEK_SET)
    body = fd_body({}, fd, 100_000)
    assert b"".join(body) == DATA[1000:101_000]
    assert not is_open(fd)


def test_a_file_that_ends_early_ends_the_body(path):
    fd = os.open(path, os.O_RDONLY)
    body = fd_body({}, fd, len(DATA) + 5000)
    assert b"".join(body) == DATA


def test_the_file_wrapper_gets_the_descriptor_and_a_bounded_read(path):
    fd = os.open(path, os.O_RDONLY)
    got = []

    def file_wrapper(filelike, block_size):
        got.append((filelike.fileno(), block_size))
        return filelike

    filelike = fd_body({"wsgi.file_wrapper": file_wrapper}, fd, 70_000)
    assert got[0][0] == fd and got[0][1] > 0
    chunks = []
    while chunk := filelike.read(got[0][1]):
        chunks.append(chunk)
    assert b"".join(chunks) == DATA[:70_000]
    filelike.close()
    assert not is_open(fd)


def test_close_before_reading_closes_and_a_second_close_leaves_a_reused_number_alone(path):
    fd = os.open(path, os.O_RDONLY)
    body = fd_body({}, fd, 10)
    body.close()
    assert not is_open(fd)
    other = os.open(path, os.O_RDONLY)  # most likely the number just freed
    try:
        body.close()
        assert is_open(other)
    finally:
        os.close(other)


def test_a_body_dropped_without_close_closes_its_descriptor(path):
    fd = os.open(path, os.O_RDONLY)
    body = fd_body({}, fd, 10)
    del body  # no close(): the last reference goes
    assert not is_open(fd)
