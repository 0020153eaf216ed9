"""Group commit (gateway/service.py, _process_loop): while a commit is in flight the gateway
keeps processing up to checkpoint.ahead_messages, and the next commit takes all of it. With
1,000 devices a commit every max_messages journals nearly every message's device state; a slow
commit that stopped processing at twice max_messages left the event loop waiting for the
database thread (issue 16, docs/benchmarks.md section 6)."""
import asyncio
import time

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


def test_processing_does_not_wait_for_a_commit_another_checkpoint_started(tmp_path, monkeypatch):
    """The timer's checkpoint (every 1 ms here) holds the lock while it waits for the commit in
    flight, then takes the snapshot. The processing loop, finding the lock held, must not queue
    behind it and then wait for the commit that checkpoint started (with nothing left to commit:
    a whole commit of stopped processing, about a tenth of the loop in the 1,000-device bench);
    it goes on until ahead_messages are pending. So every slow commit but the last takes
    ahead_messages (the old loop: every other pair took max_messages)."""
    msgs, n, _rows = bc.workload(20, 1, 300, per_msg=5, dup_frac=0)  # 20 hellos + 1,200 data messages
    cfg = bg.gateway_cfg(1883, str(tmp_path / "gw.db"), "FULL")
    cfg["checkpoint"] = {"interval_ms": 1, "max_messages": 10, "max_records": 1000000, "ahead_messages": 100}
    cfg["web"] = {"port": 0}
    orig = gstore._transaction

    def transaction(*a, **k):
        time.sleep(0.15)  # in the database thread, without the GIL: far longer than 100 messages
        return orig(*a, **k)

    monkeypatch.setattr(gstore, "_transaction", transaction)
    sizes = []

    async def go():
        made = []
        gw = Gateway(cfg, ingest_factory=lambda c, s: made.append(bc.MemIngest(msgs, c, s)) or made[0])
        commit = gw._commit

        def watched(writes, rows, mids, *a, **k):
            sizes.append(len(mids))
            return commit(writes, rows, mids, *a, **k)

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
    assert sum(sizes) == len(msgs)
    # the first commit starts before the loop is ahead, the last ones take the rest
    assert sum(1 for s in sizes[1:-2] if s < 100) <= 1, sizes
