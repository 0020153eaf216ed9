"""Storage faults: the gateway exits with a clear message and a non-zero status within seconds
(never hangs), acks nothing that is not durably committed, and loses nothing once repaired.

Start-up: garbage header, truncated file, a corrupt page (PRAGMA quick_check), a read-only
file, the metrics port taken. Running: the file deleted or replaced, the disk full (a real
tmpfs of a few hundred KiB, mounted when the tests run as root).
"""
import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from gateway.store import StoreError
from shared import wire
from tests.conftest import ROOT
from tests.test_gateway_fakes import T0, FakeDevice, pump_all, readings
from tests.test_gateway_pipeline import TOP, cfg, deliver, flush, hello, open_gw, run
from tools.proc import popen

PY = sys.executable


def gateway_cmd(db, *extra):
    return [PY, "-m", "gateway.cli", "run", "--insecure", "--db", db, "--metrics-port", "0",
            "--broker", "127.0.0.1:1"] + list(extra)


def run_gateway(args, timeout=30):
    """Run the CLI; it must exit by itself (a hang fails the test, it is not waited out)."""
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stderr, time.monotonic() - t0


def make_db(path, rows=20000):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x INTEGER, y TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(i, "row %d" % i) for i in range(rows)])
    db.commit()
    db.close()


def can_mount():
    return os.geteuid() == 0 and os.path.exists("/proc/filesystems") and "tmpfs" in open("/proc/filesystems").read()


@contextlib.contextmanager
def tmpfs(path, size):
    """A real small filesystem: a full disk and a read-only remount, as on an SD card."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % r.stderr.decode().strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def remount(path, opts):
    subprocess.run(["mount", "-o", "remount," + opts, path], check=True, capture_output=True)


# ------------------------------------------------------------------ start-up


@pytest.mark.parametrize("kind", ["garbage", "truncated", "corrupt_page"])
def test_unusable_database_exits_clearly(tmp_path, kind):
    db = str(tmp_path / "gw.db")
    if kind == "garbage":
        with open(db, "wb") as f:
            f.write(os.urandom(8192))
        want = "file is not a database"
    else:
        make_db(db)
        if kind == "truncated":
            with open(db, "r+b") as f:
                f.truncate(5000)
            want = "malformed"
        else:  # one b-tree page overwritten: opens fine, only a check finds it
            with open(db, "r+b") as f:
                f.seek(4096 * 3 + 100)
                f.write(b"\xff" * 200)
            want = "quick_check"
    rc, err, dt = run_gateway(gateway_cmd(db))
    assert rc == 1, err
    assert "gateway_failed" in err and want in err, err


def test_read_only_database_exits_clearly(tmp_path):
    if os.geteuid() != 0:
        db = str(tmp_path / "gw.db")
        make_db(db)
        os.chmod(db, 0o444)
        os.chmod(str(tmp_path), 0o555)
        try:
            rc, err, dt = run_gateway(gateway_cmd(db))
        finally:
            os.chmod(str(tmp_path), 0o755)
    else:  # root ignores file modes: a read-only filesystem
        with tmpfs(str(tmp_path / "ro"), "4m") as d:
            db = os.path.join(d, "gw.db")
            make_db(db)
            remount(d, "ro")
            rc, err, dt = run_gateway(gateway_cmd(db))
    assert rc == 1, err
    assert "readonly" in err or "read-only" in err or "unable to open" in err, err


def test_metrics_port_taken_exits_clearly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, err, dt = run_gateway(gateway_cmd(str(tmp_path / "gw.db"), "--metrics-port", str(port)))
    assert rc == 1, err
    assert "metrics endpoint" in err and "in use" in err, err


# ------------------------------------------------------------------ running: in-process


def test_deleted_or_replaced_database_is_never_acked_into(tmp_path):
    """Commits into an unlinked (or replaced) file vanish at the next start: no ack for them."""
    for how in ("delete", "replace"):
        path = str(tmp_path / ("%s.db" % how))

        async def go():
            gw = await open_gw(cfg(tmp_path, "%s.db" % how))
            try:
                hello(gw, "n1", 1)
                deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 10, T0)))
                await flush(gw)
                assert [a[1] for a in gw.ingest.acks("n1")] == [9]
                if how == "delete":
                    os.unlink(path)
                else:
                    os.rename(path, path + ".old")
                    make_db(path, 1)
                deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(10, 10, T0)))
                with pytest.raises(StoreError, match="gone|replaced"):
                    await flush(gw)
                assert [a[1] for a in gw.ingest.acks("n1")] == [9], "acked a commit into a lost file"
                assert len(gw.ingest.pubacks) == 2  # the hello and the first batch
            finally:
                await gw.store.close()
        run(go())


def test_commit_error_is_reported_not_masked_by_rollback(tmp_path):
    """SQLITE_FULL rolls the transaction back itself; the error must be the real one."""
    async def go():
        gw = await open_gw(cfg(tmp_path))
        try:
            await gw.store.db.execute("PRAGMA max_page_count=%d" % (await gw.store.db.execute_fetchall(
                "PRAGMA page_count"))[0][0])
            hello(gw, "n1", 1)
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 4000, T0, step_ms=1)))
            with pytest.raises(StoreError, match="full"):
                await flush(gw)
            assert gw.ingest.acks("n1") == [] and gw.ingest.pubacks == []
        finally:
            await gw.store.close()
    run(go())


# ------------------------------------------------------------------ running: real process, real filesystem


def _conf(tmp, broker, db, name):
    """The broker's TLS, credentials and devices file + this run's store."""
    return broker.gateway_toml(os.path.join(tmp, name + ".toml"), {
        "store": {"path": db},
        "checkpoint": {"interval_ms": 20, "ack_interval_ms": 10, "max_messages": 20}, "metrics": {"port": 0}})


def _start(conf, log):
    return popen([PY, "-m", "gateway.cli", "run", "--config", conf], cwd=ROOT, stdout=log, stderr=log,
                 env=dict(os.environ, PYTHONPATH=ROOT))


def _stored(db):
    c = sqlite3.connect(db)
    rows = c.execute("SELECT device, boot, seq FROM readings").fetchall()
    c.close()
    return rows


def _workload(broker, n_dev=3, per_dev=3000, batch=50):
    devs = []
    for i in range(n_dev):
        d = FakeDevice(broker, "s%d" % i, inflight=4, resend_s=1.0)
        for s in range(0, per_dev, batch):
            d.add_readings([(q, T0 + q * 10, 0, 0, q) for q in range(s, s + batch)])
        devs.append(d)
    return devs


def _acked_within(devs, db):
    """Every record a device saw acked is in the database."""
    have = set(_stored(db))
    for d in devs:
        mark = d.acked.get(d.boot, -1)
        missing = [s for s in range(mark + 1) if (d.dev, d.boot, s) not in have]
        assert not missing, "%s: acked up to %d, %d of them not committed" % (d.dev, mark, len(missing))


@pytest.mark.broker
@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs (a real full disk)")
def test_disk_full_then_repaired_loses_nothing(broker, tmp_path):
    with tmpfs(str(tmp_path / "small"), "400k") as d:
        db = os.path.join(d, "gw.db")
        conf = _conf(str(tmp_path), broker, db, "full")
        log_path = str(tmp_path / "gw.log")
        devs = _workload(broker)
        with open(log_path, "ab") as log:
            proc = _start(conf, log)
            try:
                for dv in devs:
                    dv.start()
                pump_all(devs, 60, until=lambda: proc.poll() is not None)
                assert proc.wait(30) == 1
                err = open(log_path).read()
                assert "gateway_failed" in err and "full" in err, err[-2000:]
                assert not all(dv.done() for dv in devs), "the disk never filled"
                time.sleep(0.5)  # acks in flight
                _acked_within(devs, db)
                remount(d, "size=64m")  # repair: more space
                proc = _start(conf, log)
                assert pump_all(devs, 90), "devices did not drain after the repair"
            finally:
                for dv in devs:
                    dv.stop()
                proc.terminate()
                proc.wait(30)
        rows = _stored(db)
        assert len(rows) == len(set(rows)) == 3 * 3000  # every record exactly once


@pytest.mark.broker
def test_database_deleted_under_the_running_gateway_exits(broker, tmp_path):
    db = str(tmp_path / "gw.db")
    conf = _conf(str(tmp_path), broker, db, "del")
    log_path = str(tmp_path / "gw.log")
    devs = _workload(broker, per_dev=6000)
    with open(log_path, "ab") as log:
        proc = _start(conf, log)
        try:
            for dv in devs:
                dv.start()
            assert pump_all(devs, 30, until=lambda: all(dv.acked.get(1, -1) > 500 for dv in devs))
            # the inodes stay readable under another name: what was acked must be in them
            os.link(db, db + ".kept")
            os.link(db + "-wal", db + ".kept-wal")
            os.unlink(db)
            t0 = time.monotonic()
            pump_all(devs, 30, until=lambda: proc.poll() is not None)
            rc = proc.wait(30)
            assert time.monotonic() - t0 < 30
            err = open(log_path).read()
            assert rc == 1 and "gateway_failed" in err and "gone" in err, err[-2000:]
            time.sleep(0.5)
            _acked_within(devs, db + ".kept")
        finally:
            for dv in devs:
                dv.stop()
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def test_no_cursor_leaves_the_database_thread(tmp_path):
    """A cursor freed in the event loop's thread resets its statement there while the database
    thread may be failing a call on the same connection: sqlite3 then loses that call's error
    (SystemError "returned NULL without setting an exception", seen in a start-up test). Every
    Database call hands back plain values, never a cursor."""
    from gateway.store import Database

    async def main():
        db = await Database.connect(str(tmp_path / "c.db"), isolation_level=None)
        try:
            got = [await db.executescript("CREATE TABLE t (x INTEGER)"),
                   await db.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)]),
                   await db.execute("DELETE FROM t WHERE x > ?", (1,)),
                   await db.execute_fetchall("SELECT x FROM t")]
        finally:
            await db.close()
        assert not any(isinstance(v, sqlite3.Cursor) for v in got), got
        assert got[1:] == [3, 2, [(1,)]]

    asyncio.run(main())
