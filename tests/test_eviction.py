"""cachefetch.eviction: S3-FIFO and LRU on small hand-made sequences, in memory
and on a real SQLite index, and the two backends agreeing on a random trace."""
from __future__ import annotations

import random

import pytest

from cachefetch.eviction import LRU, MAIN, PENDING, S3FIFO, SMALL, Item, MemoryQueues, make_policy, replay
from cachefetch.hashing import hash_bytes
import cachefetch.index as index_module
from cachefetch.index import ROW_WEIGHT, Entry, SQLiteIndex


def run(state: MemoryQueues, policy, capacity: int, requests) -> list:
    """Replay ``requests`` (ids, weight 100 each) on ``state``; returns the ids evicted, in order."""
    evicted = []
    for t, id in enumerate(requests, 1):
        if id in state:
            state.hit(id, t)
            continue
        policy.admit(state, state.add(id, 100, t))
        if state.used() > capacity:
            for victim in policy.victims(state):
                evicted.append(victim.id)
                if state.used() <= capacity:
                    break
    return evicted


def warm(state, policy, ids) -> None:
    """Store ``ids`` in a cache that has been full before (so S3-FIFO puts newcomers in small)."""
    state.mark_full()
    for t, id in enumerate(ids, 1):
        policy.admit(state, state.add(id, 100, t))


# -- S3-FIFO -------------------------------------------------------------------

def test_one_hit_wonders_are_evicted_from_small_while_the_hot_set_stays():
    state, s3 = MemoryQueues(), S3FIFO(1000, small_ratio=0.2)
    hot = [f"h{i}" for i in range(7)]
    wonders = [f"w{i}" for i in range(40)]
    requests = hot + hot
    for i, w in enumerate(wonders):
        requests += [w, hot[i % 7]]
    evicted = run(state, s3, 1000, requests)
    assert len(evicted) >= 30 and set(evicted) <= set(wonders)
    assert all(h in state for h in hot)
    # LRU, on the same requests, lets the one-hit wonders push hot objects out.
    lru_state = MemoryQueues()
    assert not set(run(lru_state, LRU(1000), 1000, requests)) <= set(wonders)


def test_until_the_first_eviction_newcomers_that_find_small_full_go_to_main():
    state, s3 = MemoryQueues(), S3FIFO(1000, small_ratio=0.2)
    for t, id in enumerate("abcde", 1):
        s3.admit(state, state.add(id, 100, t))
    assert [state.get(k).queue for k in "abcde"] == [SMALL, SMALL, MAIN, MAIN, MAIN]


def test_an_object_used_in_small_moves_to_main_the_unused_one_goes():
    state, s3 = MemoryQueues(), S3FIFO(500, small_ratio=0.4)
    warm(state, s3, "abcde")
    state.hit("a", 10)
    assert run(state, s3, 500, ["x"]) == ["b"]
    assert (state.get("a").queue, state.get("a").freq) == (MAIN, 0)


def test_main_is_a_clock_used_objects_go_round_with_one_use_fewer():
    state, s3 = MemoryQueues(), S3FIFO(500, small_ratio=0.4)
    warm(state, s3, "abcde")
    for k in "abcde":
        state.hit(k, 10)
    assert run(state, s3, 500, ["x"]) == ["x"]  # a..e move to main; x, never used, goes
    assert run(state, s3, 500, ["y"]) == ["a"]  # main over its 300 bytes: its unused head goes
    state.hit("b", 20)
    assert run(state, s3, 500, ["z"]) == ["c"]  # b was used: back to the tail, one use fewer
    assert (state.get("b").queue, state.get("b").freq) == (MAIN, 0)


def test_a_ghost_hit_goes_straight_to_main():
    state, s3 = MemoryQueues(), S3FIFO(500, small_ratio=0.4)
    warm(state, s3, "abcde")
    assert run(state, s3, 500, ["x"]) == ["a"]  # evicted from small, unused: remembered
    assert state.ghost_bytes() == 100
    assert run(state, s3, 500, ["a"]) == ["b"]
    assert state.get("a").queue == MAIN


def test_the_ghost_is_bounded_by_its_share_of_the_bytes():
    state, s3 = MemoryQueues(), S3FIFO(500, small_ratio=0.4, ghost_ratio=0.5)
    warm(state, s3, "abcde")
    run(state, s3, 500, [f"junk{i}" for i in range(20)])
    assert state.ghost_bytes() == 200


def test_an_object_too_big_for_small_is_remembered_and_admitted_to_main_when_asked_again():
    state, s3 = MemoryQueues(), S3FIFO(1000)  # small: 100 bytes
    warm(state, s3, [])
    big = state.add("big", 150, 30)
    assert s3.admit(state, big) is False and "big" not in state
    big = state.add("big", 150, 31)
    assert s3.admit(state, big) is True and state.get("big").queue == MAIN


def test_passed_over_objects_stay_and_protected_ones_stop_eviction():
    state, s3 = MemoryQueues(), S3FIFO(500, small_ratio=0.4)
    warm(state, s3, "abcde")
    victims = s3.victims(state, can_evict=lambda item: item.id != "a")
    assert next(victims).id == "b"  # a (being served, say) may not go: passed over
    assert "a" in state
    assert list(s3.victims(state, protect_from=0.0)) == []  # all used at or after 0


def test_s3fifo_rejects_bad_settings():
    for kwargs in ({"small_ratio": 1.5}, {"ghost_ratio": -0.1}, {"move_threshold": 0}, {"move_threshold": 4}):
        with pytest.raises(ValueError):
            S3FIFO(1000, **kwargs)
    with pytest.raises(ValueError):
        S3FIFO(-1)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("arc", 10)


# -- LRU -----------------------------------------------------------------------

def test_lru_evicts_by_last_use_and_passes_over_what_may_not_go():
    state, lru = MemoryQueues(), LRU(500, page=2)
    warm(state, lru, "abcde")
    state.hit("a", 10)
    state.hit("c", 11)
    assert run(state, lru, 500, ["x", "y"]) == ["b", "d"]
    victims = lru.victims(state, can_evict=lambda item: item.id != "e")
    assert [next(victims).id, next(victims).id] == ["a", "c"]  # e passed over, stays
    assert "e" in state


def test_replay_counts_misses_and_bytes():
    result = replay([("a", 10), ("b", 30), ("a", 10), ("c", 1000), ("c", 1000)], LRU(100), 100)
    assert (result.requests, result.misses, result.bytes, result.missed_bytes) == (5, 4, 2050, 2040)
    assert result.miss_ratio == 0.8 and result.byte_miss_ratio == pytest.approx(2040 / 2050)


# -- the SQLite backend ------------------------------------------------------

def test_touch_many_feeds_the_use_count_capped_at_three(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    try:
        index.put(Entry("k", "", hash_bytes(b"k"), 10))
        queues = index.queues()
        with index.transaction():
            (item,) = queues.pending(10)
        assert (item.queue, item.freq, item.weight) == (PENDING, 0, 10 + ROW_WEIGHT)
        for when in range(1, 6):
            index.touch_many({("k", ""): float(when)})
        with index.transaction():
            (item,) = queues.pending(10)
        assert (item.freq, item.last_used) == (3, 5.0)
    finally:
        index.close()


def _sqlite_step(index: SQLiteIndex, policy, capacity: int, t: int, key: str, size: int, evicted: list) -> None:
    if index.get(key):
        index.touch_many({(key, ""): float(t)})
        return
    index.put(Entry(key, "", hash_bytes(key.encode()), size))
    index.touch(key, "", float(t))  # the use that stored it, at trace time (put records the wall clock)
    queues = index.queues()
    with index.transaction():
        for item in queues.pending(10):
            policy.admit(queues, item)
        used = sum(queues.queue_bytes(q) for q in (PENDING, SMALL, MAIN))
        if used > capacity:
            for victim in policy.victims(queues):
                evicted.append(victim.id[0])
                if sum(queues.queue_bytes(q) for q in (PENDING, SMALL, MAIN)) <= capacity:
                    break


def _memory_step(state: MemoryQueues, policy, capacity: int, t: int, key: str, size: int, evicted: list) -> None:
    if key in state:
        state.hit(key, float(t))
        return
    item = state.add(key, size + ROW_WEIGHT, float(t))
    state.hit(key, float(t))
    policy.admit(state, state.get(item.id))
    if state.used() > capacity:
        for victim in policy.victims(state):
            evicted.append(victim.id)
            if state.used() <= capacity:
                break


@pytest.mark.parametrize("page", [512, 2], ids=["pages of 512", "pages of 2"])
@pytest.mark.parametrize("name", ["s3fifo", "lru"])
def test_sqlite_and_memory_backends_agree_on_a_random_trace(tmp_path, monkeypatch, name, page):
    # Pages of 2: the SQLite queues run out of what they read ahead mid-eviction,
    # and write what they owe before reading on, many times per pass.
    monkeypatch.setattr(index_module, "_PAGE", page)
    rng = random.Random(7)
    sizes = {f"k{i}": rng.randrange(0, 3000) for i in range(60)}
    keys = list(sizes)
    trace = [keys[min(int(rng.paretovariate(0.9)) - 1, 59)] if rng.random() < 0.7 else rng.choice(keys)
             for _ in range(600)]
    capacity = 12 * (1500 + ROW_WEIGHT)
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    state = MemoryQueues()
    sql_policy, mem_policy = make_policy(name, capacity), make_policy(name, capacity)
    from_sqlite: list = []
    from_memory: list = []
    try:
        for t, key in enumerate(trace, 1):
            _sqlite_step(index, sql_policy, capacity, t, key, sizes[key], from_sqlite)
            _memory_step(state, mem_policy, capacity, t, key, sizes[key], from_memory)
        assert len(from_memory) > 100  # the trace did exercise eviction
        assert from_sqlite == from_memory
        assert {e.key for e in index} == {k for k in keys if k in state}
        queues = index.queues()
        with index.transaction():
            for q in (SMALL, MAIN):
                assert queues.queue_bytes(q) == state.queue_bytes(q)
            assert queues.ghost_bytes() == state.ghost_bytes()
    finally:
        index.close()


def test_the_queues_survive_a_restart_and_are_shared(tmp_path):
    path = tmp_path / "i.sqlite3"
    a = SQLiteIndex(path)
    s3 = S3FIFO(10 * (100 + ROW_WEIGHT), small_ratio=0.3)
    try:
        for i in range(12):
            a.put(Entry(f"k{i}", "", hash_bytes(b"%d" % i), 100))
        queues = a.queues()
        with a.transaction():
            queues.mark_full()  # has been full before: newcomers go to small
            for item in queues.pending(100):
                s3.admit(queues, item)
            victim = next(s3.victims(queues))
        assert victim.id == ("k0", "")
    finally:
        a.close()
    b = SQLiteIndex(path)  # another process, or the same one restarted
    try:
        queues = b.queues()
        with b.transaction():
            assert queues.been_full() and queues.ghost_bytes() == 100 + ROW_WEIGHT
            assert queues.queue_len(SMALL) + queues.queue_len(MAIN) == 11
        b.put(Entry("k0", "", hash_bytes(b"0"), 100))  # asked again: the ghost remembers it
        with b.transaction():
            (item,) = queues.pending(10)
            s3.admit(queues, item)
            assert queues.head(MAIN) is not None
        assert [row for row in b._connect().execute("SELECT queue FROM entries WHERE key = 'k0'")] == [(MAIN,)]
    finally:
        b.close()


def test_sqlite_queues_refuse_to_number_places_outside_a_transaction(tmp_path):
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    try:
        index.put(Entry("k", "", hash_bytes(b"k"), 1))
        queues = index.queues()
        (item,) = queues.pending(1)
        with pytest.raises(RuntimeError, match="transaction"):
            queues.push(item, SMALL, 0)
    finally:
        index.close()


def _look(state) -> tuple:
    heads = tuple(None if (h := state.head(q)) is None else (h.id, h.queue, h.freq) for q in (SMALL, MAIN))
    return (heads, tuple(state.queue_len(q) for q in (PENDING, SMALL, MAIN)),
            tuple(state.queue_bytes(q) for q in (PENDING, SMALL, MAIN)), state.ghost_bytes())


def test_sqlite_queues_follow_the_memory_ones_through_random_moves(tmp_path, monkeypatch):
    """Every QueueState call, in random order (moves of heads and of items
    behind them, the ghost's three), answered the same by both backends after
    each call, with pages of two so the SQLite side reads ahead, runs out and
    writes what it owes all the time."""
    monkeypatch.setattr(index_module, "_PAGE", 2)
    rng = random.Random(11)
    index = SQLiteIndex(tmp_path / "i.sqlite3")
    memory = MemoryQueues()
    try:
        for i in range(40):
            index.put(Entry(f"k{i}", "", hash_bytes(b"%d" % i), 10 * i))
            index.touch(f"k{i}", "", float(i))
            memory.add((f"k{i}", ""), 10 * i + ROW_WEIGHT, float(i))
        queues = index.queues()
        stored, gone = {(f"k{i}", "") for i in range(40)}, []
        for _ in range(150):
            with index.transaction():
                assert _look(queues) == _look(memory)
                # Some transactions only touch the ghost (nothing else makes the SQLite side write and read again).
                menu = rng.choice([["admit", "push head", "push head", "remove", "ghost add", "ghost take",
                                    "ghost drop"], ["ghost add", "ghost take", "ghost drop"]])
                for _ in range(rng.randrange(1, 12)):
                    op = rng.choice(menu)
                    to, freq = rng.choice([SMALL, MAIN]), rng.randrange(4)
                    if op == "admit" and memory.queue_len(PENDING):
                        (a,), (b,) = queues.pending(1), memory.pending(1)
                        queues.push(a, to, freq)
                        memory.push(b, to, freq)
                    elif op == "push head":
                        q = rng.choice([SMALL, MAIN])
                        a, b = queues.head(q), memory.head(q)
                        if b is not None:
                            queues.push(a, to, freq)
                            memory.push(b, to, freq)
                    elif op == "remove" and stored:
                        id = rng.choice(sorted(stored))  # often behind a head
                        (a,) = [i for i in queues.least_recently_used(None, 100) if i.id == id]
                        queues.remove(a)
                        memory.remove(memory.get(id))
                        stored.discard(id)
                        gone.append(Item(id, a.weight))
                    elif op == "ghost add" and gone:
                        item = rng.choice(gone[-5:])  # a few, so that they meet in the ghost
                        queues.ghost_add(item)
                        memory.ghost_add(item)
                    elif op == "ghost take" and gone:
                        item = rng.choice(gone[-5:])
                        assert queues.ghost_take(item) == memory.ghost_take(item)
                    elif op == "ghost drop":
                        assert queues.ghost_drop_oldest() == memory.ghost_drop_oldest()
                    assert _look(queues) == _look(memory), op
        assert len(gone) > 5
    finally:
        index.close()
