"""The collector's PostgreSQL backend (asyncpg) against a real PostgreSQL started here from
Debian's postgresql package (initdb + postgres on a free loopback port, stopped in finally),
fed through a real nats-server: rows land once per key, duplicates counted, bad input refused.
Skipped with the reason when this machine has no PostgreSQL server binaries."""
import asyncio
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from gateway import collector as C
from tests.test_sinks import stop_collector, until
from tools.natscluster import NatsCluster, die_with_parent, free_port

T0 = 1767225600000


def pg_bin():
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "postgres")):
            return d
    return None


class Postgres:
    def __init__(self):
        self.bin = pg_bin()
        self.dir = tempfile.mkdtemp(prefix="edgeflow-pg-")
        self.port = free_port()
        self.proc = None
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self):
        if self.as_user:  # postgres refuses to run as root
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres")
        data = os.path.join(self.dir, "data")
        subprocess.run(self.as_user + [os.path.join(self.bin, "initdb"), "-D", data, "--auth=trust", "-U", "postgres",
                                       "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc = subprocess.Popen(self.as_user + [os.path.join(self.bin, "postgres"), "-D", data, "-p",
                                                     str(self.port), "-c", "listen_addresses=127.0.0.1", "-k",
                                                     self.dir, "-c", "fsync=on"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.time() + 30
        while time.time() < deadline:
            r = subprocess.run([os.path.join(self.bin, "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               stdout=subprocess.DEVNULL)
            if r.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    @property
    def dsn(self):
        return "postgresql://postgres@127.0.0.1:%d/postgres" % self.port

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()  # runuser passes SIGTERM on: a smart shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL server binaries (Debian package postgresql)")
def test_collector_postgres_backend_dedups_and_quarantines(tmp_path):
    asyncpg = pytest.importorskip("asyncpg")
    pg = Postgres().start()
    cluster = NatsCluster(tmp_path / "nats", 1).start()
    url = cluster.urls[0]

    async def main():
        import nats
        coll = C.Collector(C.load_config(None, {"nats.servers": [url], "store.backend": "postgres",
                                                "store.dsn": pg.dsn}))
        task = asyncio.ensure_future(coll.run())
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            for _ in range(100):
                try:
                    await js.stream_info("EDGEFLOW_SINK")
                    break
                except Exception:  # noqa: BLE001 - the collector creates it
                    await asyncio.sleep(0.1)
            rows = [["d1", 1, s, T0 + s, 0, 0, 20000 + s] for s in range(10)]
            win = ["group", "site-temp", 0, T0, T0 + 2000, 0, 4, 86000, 21000, 22000, 21500.0, None, T0 + 2000]
            for site in ("a", "b"):
                body = {"v": 1, "site": site, "table": "readings", "rows": rows}
                await js.publish("edgeflow.sink.%s.readings" % site, json.dumps(body).encode())
            body = {"v": 1, "site": "a", "table": "readings", "rows": rows[5:] + [["d1", 1, 10, T0, 0, 0, 1]]}
            await js.publish("edgeflow.sink.a.readings", json.dumps(body).encode())  # 5 duplicates, 1 new
            await js.publish("edgeflow.sink.a.window_revisions",
                             json.dumps({"v": 1, "site": "a", "table": "window_revisions", "rows": [win]}).encode())
            await js.publish("edgeflow.sink.a.readings", b"{not json")
            await until(lambda: coll.messages >= 5)
            assert coll.messages == 5 and coll.bad == 1 and coll.rows_new == 22 and coll.rows_dup == 5
        finally:
            await nc.close()
            await stop_collector(task, coll)
        conn = await asyncpg.connect(pg.dsn)
        try:
            got = await conn.fetch("SELECT site, count(*) AS n FROM readings GROUP BY site ORDER BY site")
            assert [(r["site"], r["n"]) for r in got] == [("a", 11), ("b", 10)]
            w = await conn.fetchrow('SELECT "end", mean, std FROM window_revisions WHERE site = $1', "a")
            assert (w["end"], w["mean"], w["std"]) == (T0 + 2000, 21500.0, None)
            s = await conn.fetchrow("SELECT messages, rows_new, rows_dup FROM sites WHERE site = 'a'")
            assert tuple(s) == (3, 12, 5)
            q = await conn.fetch("SELECT reason FROM quarantine")
            assert [r["reason"] for r in q] == ["bad_json"]
        finally:
            await conn.close()
    try:
        asyncio.run(main())
    finally:
        cluster.stop()
        pg.stop()
