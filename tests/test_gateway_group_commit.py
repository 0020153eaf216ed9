"""Group commit (gateway/service.py, _process_loop): while a commit is in flight the gateway
keeps processing up to checkpoint.ahead_messages, and the next commit takes all of it. With
1,000 devices a commit every max_messages journals nearly every message's device state; a slow
commit that stopped processing at twice max_messages left the event loop waiting for the
database thread (issue 16, docs/benchmarks.md section 6)."""
import asyncio
import sqlite3
import time

import pytest

from gateway import store as gstore
from gateway.service import Gateway
from tools import bench_compare as bc
from tools import bench_gateway as bg


def test_processing_runs_ahead_of_a_slow_commit_and_the_next_commit_takes_it_all(tmp_path, monkeypatch):
    msgs, n, _rows = bc.workload(20, 1, 600, per_msg=10, dup_frac=0)  # 20 hellos + 1,200 data messages
    cfg = bg.gateway_cfg(1883, str(tmp_path / "gw.db"), "FULL")
    cfg["checkpoint"] = {"interval_ms": 60000, "max_messages": 10, "max_records": 1000000, "ahead_messages": 100}
    cfg["web"] = {"port": 0}
    slow = [0.0]
    orig = gstore._transaction

    def transaction(*a, **k):
        time.sleep(slow[0])  # in the database thread, without the GIL
        return orig(*a, **k)

    monkeypatch.setattr(gstore, "_transaction", transaction)
    sizes = []  # messages per commit, and how many were pending when each began
    pending_max = [0]

    async def go():
        made = []
        gw = Gateway(cfg, ingest_factory=lambda c, s: made.append(bc.MemIngest(msgs, c, s)) or made[0])
        commit = gw._commit

        async def watched(writes, rows, mids, *a, **k):
            sizes.append(len(mids))
            slow[0] = 0.3 if len(sizes) == 2 else 0.0  # the second commit is slow
            t = asyncio.ensure_future(commit(writes, rows, mids, *a, **k))
            while not t.done():  # what the loop does meanwhile
                pending_max[0] = max(pending_max[0], len(gw.out.mids))
                await asyncio.sleep(0.005)
            return t.result()

        gw._commit = watched
        task = asyncio.ensure_future(gw.run())
        for _ in range(3000):  # at most 30 s
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
            if gw.stats.readings >= n and not gw.out.mids and (gw._commit_task is None or gw._commit_task.done()):
                break
        readings = gw.stats.readings
        gw.stop()
        await task
        return readings

    assert asyncio.run(go()) == n
    # during the slow commit the loop went on up to ahead_messages (not 2 x max_messages) ...
    assert pending_max[0] == 100, (pending_max, sizes)
    # ... and the commit after it took them all at once
    assert max(sizes) >= 100, sizes
    assert sum(sizes) == len(msgs)


def _run_slow(tmp_path, monkeypatch, transaction, msgs, n, watch=None, interval_ms=60000):
    cfg = bg.gateway_cfg(1883, str(tmp_path / "gw.db"), "FULL")
    cfg["checkpoint"] = {"interval_ms": interval_ms, "max_messages": 10, "max_records": 1000000, "ahead_messages": 100}
    cfg["web"] = {"port": 0}
    monkeypatch.setattr(gstore, "_transaction", transaction)

    async def go():
        made = []
        gw = Gateway(cfg, ingest_factory=lambda c, s: made.append(bc.MemIngest(msgs, c, s)) or made[0])
        if watch:
            watch(gw)
        task = asyncio.ensure_future(gw.run())
        for _ in range(3000):  # at most 30 s
            await asyncio.sleep(0.01)
            if task.done():
                break
            if gw.stats.readings >= n and not gw.out.mids and (gw._commit_task is None or gw._commit_task.done()):
                break
        gw.stop()
        try:
            await task
        except Exception as e:  # noqa: BLE001 - returned to the test
            return gw, made[0], e
        return gw, made[0], None

    return asyncio.run(go())


def test_processing_does_not_wait_for_a_commit_another_checkpoint_started(tmp_path, monkeypatch):
    """The timer's checkpoint (every 1 ms here) waits for the commit in flight, then takes the
    snapshot. The processing loop must not queue behind it and then wait for the commit that
    checkpoint started (with nothing left to commit: a whole commit of stopped processing, about
    a tenth of the loop in the 1,000-device bench); it goes on until ahead_messages are pending.
    So every slow commit but the last takes ahead_messages (the old loop, which waited on the
    checkpoint lock: every other pair took max_messages)."""
    msgs, n, _rows = bc.workload(20, 1, 300, per_msg=5, dup_frac=0)  # 20 hellos + 1,200 data messages
    orig = gstore._transaction

    def transaction(*a, **k):
        time.sleep(0.15)  # in the database thread, without the GIL: far longer than 100 messages
        return orig(*a, **k)

    sizes = []

    def watch(gw):
        commit = gw._commit

        def watched(writes, rows, mids, *a, **k):
            sizes.append(len(mids))
            return commit(writes, rows, mids, *a, **k)
        gw._commit = watched
        gw.store.pipelined = False  # one commit in flight: what is measured is the waiting

    gw, _ingest, err = _run_slow(tmp_path, monkeypatch, transaction, msgs, n, watch, interval_ms=1)
    assert err is None and gw.stats.readings == n
    assert sum(sizes) == len(msgs)
    # the first commit starts before the loop is ahead, the last ones take the rest
    assert sum(1 for s in sizes[1:-2] if s < 100) <= 1, sizes


def test_a_commit_queues_behind_the_one_in_flight_and_they_commit_in_order(tmp_path, monkeypatch):
    """Pipelined store: when the loop is ahead_messages ahead of a slow commit, the next commit
    is handed to the database thread at once (queued behind it), not after it: the database
    thread goes from one to the next. Never more than two; every message committed once."""
    msgs, n, _rows = bc.workload(20, 1, 300, per_msg=5, dup_frac=0)
    orig = gstore._transaction
    order = []

    def transaction(conn, writes, *a, **k):
        time.sleep(0.1)
        order.append(dict(writes).get("state_journal"))
        return orig(conn, writes, *a, **k)

    flight = [0, 0]  # in flight, most at once
    submitted = []

    def watch(gw):
        commit = gw.store.commit

        async def counted(writes):
            submitted.append(dict(writes).get("state_journal"))
            flight[0] += 1
            flight[1] = max(flight[1], flight[0])
            try:
                return await commit(writes)
            finally:
                flight[0] -= 1
        gw.store.commit = counted

    gw, ingest, err = _run_slow(tmp_path, monkeypatch, transaction, msgs, n, watch)
    assert err is None and gw.stats.readings == n and ingest.acked == len(msgs)
    assert flight[1] == 2, flight
    assert order == submitted  # the database thread ran them as handed over


def test_no_commit_queued_behind_a_failed_one_is_written(tmp_path, monkeypatch):
    """Each commit holds the state changed since the one before: one queued behind a commit that
    fails must not be written (its dedup marks would cover records the failed one held, and
    they were never acked: resent, they would be taken for duplicates). The gateway stops;
    nothing of either is acked."""
    msgs, n, _rows = bc.workload(20, 1, 300, per_msg=5, dup_frac=0)
    orig = gstore._transaction
    calls = []

    def transaction(conn, writes, *a, **k):
        calls.append(len(calls))
        if len(calls) == 3:
            time.sleep(0.3)  # the loop runs ahead meanwhile and queues the next commit
            raise sqlite3.OperationalError("disk I/O error")
        return orig(conn, writes, *a, **k)

    queued = [0]

    def watch(gw):
        commit = gw.store.commit

        async def counted(writes):
            queued[0] += 1
            return await commit(writes)
        gw.store.commit = counted

    gw, ingest, err = _run_slow(tmp_path, monkeypatch, transaction, msgs, n, watch)
    assert isinstance(err, sqlite3.Error), err
    assert queued[0] >= 4  # a commit was handed over behind the failing one ...
    assert len(calls) == 3, calls  # ... and never written
    assert gw.stats.checkpoint_failures >= 1
    c = sqlite3.connect(str(tmp_path / "gw.db"))
    try:
        journal = c.execute("SELECT count(*) FROM state_journal").fetchone()[0]
    finally:
        c.close()
    assert journal <= 2  # the first two commits' rows (a fold may have emptied it), no third


@pytest.mark.parametrize("retain", [False, True])
def test_the_records_bound_counts_rows_held_not_aggregated_readings(tmp_path, monkeypatch, retain):
    """Twice max_records bounds the rows held while a commit is in flight (memory). Without raw
    retention a reading is a window aggregate, no row: the loop runs ahead to ahead_messages
    (larger, fewer commits); with raw rows it stops at twice max_records."""
    msgs, n, _rows = bc.workload(20, 1, 600, per_msg=10, dup_frac=0)  # 20 hellos + 1,200 data messages
    held = [0, 0]  # most messages, rows pending while the slow commit ran
    calls = []

    def transaction(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.5)  # the second commit is slow
        return orig(*a, **k)

    def watch(gw):
        gw.retain = retain
        gw.cfg.checkpoint.max_records = 50  # ahead: 100 records, 10 messages of 10 readings
        commit = gw._commit

        async def watched(*a, **k):
            t = asyncio.ensure_future(commit(*a, **k))
            while not t.done():
                held[0] = max(held[0], len(gw.out.mids))
                o = gw.out
                held[1] = max(held[1], len(o.readings) // 7 + len(o.reading_spans))
                await asyncio.sleep(0.005)
            return t.result()
        gw._commit = watched

    orig = gstore._transaction
    gw, ingest, err = _run_slow(tmp_path, monkeypatch, transaction, msgs, n, watch)
    assert err is None and gw.stats.readings == n
    if retain:
        assert held[1] <= 100 + 10 and held[0] <= 12, held  # a message's rows over the bound at most
    else:
        assert held[0] >= 100 and held[1] == 0, held
