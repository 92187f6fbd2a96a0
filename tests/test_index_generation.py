"""The index's generation file, read through a mapping (or with pread where a
file cannot be mapped): a change through one SQLiteIndex is seen by the very
next get of another on the same file (as two workers' are)."""
from __future__ import annotations

import mmap

import pytest

from cachefetch import index as index_module
from cachefetch.hashing import Hash
from cachefetch.index import Entry, SQLiteIndex


def entry(n: int) -> Entry:
    return Entry("k", "", Hash.from_hex(f"{n:02x}" * 32), n, stored_at=1000.0 + n)


@pytest.mark.parametrize("mapped", [True, False])
def test_a_change_through_one_index_is_seen_by_the_next_get_of_another(tmp_path, monkeypatch, mapped):
    if not mapped:
        def cannot_map(*args, **kw):
            raise OSError("no mmap here")

        monkeypatch.setattr(mmap, "mmap", cannot_map)
    path = tmp_path / "index.sqlite3"
    writer, reader = SQLiteIndex(path), SQLiteIndex(path)
    try:
        assert reader.get("k") == []
        writer.put(entry(1))
        assert reader.get("k") == [entry(1)]
        assert reader.get("k") is reader.get("k")  # the memo, while nothing changes
        writer.put(entry(2))
        assert reader.get("k") == [entry(2)]
        writer.delete("k")
        assert reader.get("k") == []
        view = reader._local.view
        assert isinstance(view, mmap.mmap) if mapped else isinstance(view, index_module._PreadView)
    finally:
        writer.close()
        reader.close()
