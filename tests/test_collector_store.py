"""The collector's SQLite store (gateway/collector.py): its connection is used by one thread
only, and close() never overlaps a write still running (the collector cancels its task on
SIGTERM while a batch may be in the database thread)."""
import asyncio
import sqlite3
import time

from gateway import collector as C

T0 = 1767225600000


def _rows(n):
    return [("dev%03d" % (s % 7), 1, s, T0 + s, s % 3, 0, s) for s in range(n)]


def test_close_waits_for_a_cancelled_write(tmp_path):
    """SIGTERM cancels the collector's task while its batch is in the database thread: close()
    must wait for that write (committed or rolled back whole, never cut by a close from another
    thread). Fails on a store whose close() closes the connection under the running write."""
    path = str(tmp_path / "central.db")
    events = []

    async def go():
        st = C.SqliteStore(path)
        await st.open()
        orig = st._write

        def slow(*a):
            events.append("started")
            time.sleep(0.3)  # the cancel and close() arrive meanwhile
            try:
                return orig(*a)
            finally:
                events.append("done")

        st._write = slow
        task = asyncio.ensure_future(st.write([("s1", "readings", _rows(20000))], [], T0))
        for _ in range(200):
            if events:
                break
            await asyncio.sleep(0.01)
        assert events == ["started"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await st.close()
        events.append("closed")

    asyncio.run(go())
    assert events == ["started", "done", "closed"]
    c = sqlite3.connect(path)
    try:
        assert c.execute("SELECT count(*) FROM readings").fetchone()[0] in (0, 20000)
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        c.close()


def test_failed_write_reports_its_own_error_and_counts_nothing(tmp_path):
    """A write that fails (here: the disk full, by max_page_count) raises its own error, not
    'no transaction is active' from a ROLLBACK SQLite already did, and the quarantine count
    stays what the database holds."""
    path = str(tmp_path / "central.db")

    async def go():
        st = C.SqliteStore(path)
        await st.open()
        try:
            st_rows = _rows(50000)
            bad = [("edgeflow.sink.x", "bad", "", b"x" * 100)] * 3
            await st.db.execute("PRAGMA max_page_count = 64")  # the store's own connection: the limit is per connection
            try:
                await st.write([("s1", "readings", st_rows)], bad, T0)
            except sqlite3.DatabaseError as e:
                err = e
            else:
                err = None
            q = st.q_rows
            await st.db.execute("PRAGMA max_page_count = 1000000")
            again = await st.write([("s1", "readings", _rows(10))], [], T0)
            return err, q, again
        finally:
            await st.close()

    err, q, again = asyncio.run(go())
    assert err is not None and "full" in str(err), err
    assert q == 0
    assert again["s1"][1] == 10
