"""Downstream exactly-once under faults: two sites -> a 3-node NATS JetStream cluster -> the collector,
plus an alert webhook that misbehaves on purpose. Prints figures; exit 0 only if exact.

    python -m tools.sinkfaults                          # full run: 90 s of traffic, link cut 60 s
    python -m tools.sinkfaults --duration 20 --cut 5    # the short variant the suite runs

On this machine, all on 127.0.0.1: a NATS cluster (tools/natscluster.py, JetStream, stream
replicas 3); two sites, each a mosquitto + a gateway subprocess (tools/fleet.py Site) + a fleet
of real firmware Apps, the gateway with a jetstream sink (records + window revisions) and a
webhook sink (alerts); the collector subprocess (gateway/collector.py); a webhook receiver that
answers 5xx, applies-then-fails and times out for about half of the requests, and dedups on
Idempotency-Key. At random moments (seeded): kill -9 a NATS node, a site's gateway, the
collector (each restarted after a while), and cut one site's link to NATS (LinkProxy.down()).
Then every device drains, the gateways drain their sink outboxes, and the check runs:
  - each site's SQLite against its fleet's ground truth (tools/groundtruth.py);
  - central store vs each site's store, table by table, row by row (same key set, same values):
    every record, window revision and alert present exactly once per site;
  - webhook receiver: every alert of every site applied exactly once.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from aiohttp import web  # noqa: E402

from gateway.sinks import tables as T  # noqa: E402
from tools import groundtruth  # noqa: E402
from tools.fleet import Fleet, Site  # noqa: E402
from tools.natscluster import LinkProxy, NatsCluster, die_with_parent, free_port  # noqa: E402

PY = sys.executable
GW = dict(window_ms=2000, lateness_ms=3000, ooo_ms=500, idle_ms=4000)
CHECK_TABLES = ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status",
                "window_revisions")
ALERT_TABLES = ("cep_events", "anomalies")


class WebhookReceiver:
    """aiohttp server in its own thread. Per request (seeded): 200 after applying; 500 without
    applying; applies then answers 503 (the sender must resend, the receiver must dedup);
    applies then stalls past the sender's timeout. `applied`: key -> body (dedup on the key)."""

    def __init__(self, fail=0.5, stall_s=2.0, seed=1):
        self.fail, self.stall_s = fail, stall_s
        self.rng = random.Random(seed)
        self.port = free_port()
        self.applied = {}
        self.posts = self.dups = self.errors = self.stalls = 0
        self.no_key = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._th = threading.Thread(target=self._run, name="webhook-receiver", daemon=True)
        self._th.start()
        self._ready.wait(5)

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.port

    def _run(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def _apply(self, key, body):
        if key in self.applied:
            self.dups += 1
        else:
            self.applied[key] = body

    async def _hook(self, req):
        self.posts += 1
        body = await req.read()
        key = req.headers.get("Idempotency-Key")
        if not key:
            self.no_key += 1
            return web.Response(status=400, text="no Idempotency-Key")
        r = self.rng.random()
        f = self.fail
        if r < f * 0.4:
            self.errors += 1
            return web.Response(status=500, text="failing on purpose")
        self._apply(key, body)
        if r < f * 0.7:
            self.errors += 1
            return web.Response(status=503, text="applied, then failed on purpose")
        if r < f:
            self.stalls += 1
            await asyncio.sleep(self.stall_s)
        return web.Response(status=200, text="ok")

    def close(self):
        async def fin():
            await self._runner.cleanup()
            self._loop.stop()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(fin(), self._loop)
        self._th.join(5)


class CollectorProc:
    def __init__(self, workdir, urls, db, replicas=3):
        self.dir = workdir
        self.urls, self.db, self.replicas = urls, db, replicas
        self.proc = None
        self.kills = 0

    def start(self):
        with open(os.path.join(self.dir, "collector.log"), "ab") as log:
            self.proc = subprocess.Popen([PY, "-m", "gateway.collector", "run", "--nats", ",".join(self.urls), "--db",
                                          self.db, "--replicas", str(self.replicas), "--max-stream-bytes", str(256 << 20)], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.kills += 1
        self.proc = None

    def stop(self):
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            return p.returncode


def sink_toml(site_id, nats_urls, webhook_url, replicas=3, timeout_s=1.0):
    """The [sinks] part of a site gateway's config."""
    return "\n".join([
        "[sinks]", "site = %s" % json.dumps(site_id), "",
        "[[sinks.sink]]", 'name = "central"', 'type = "jetstream"', "servers = %s" % json.dumps(nats_urls),
        'tables = ["records", "windows"]', "replicas = %d" % replicas, "max_stream_bytes = %d" % (256 << 20), "timeout_s = 2.0", "retry_max_s = 2.0",
        "",
        "[[sinks.sink]]", 'name = "alerts"', 'type = "webhook"', "url = %s" % json.dumps(webhook_url),
        "timeout_s = %s" % timeout_s, "retry_max_s = 1.0", "rate = 200.0", "burst = 50", ""])


def rows_by_key(db_path, table, site=None):
    cols, key, _a = T.TABLES[table]
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
    try:
        q = 'SELECT %s FROM %s' % (", ".join('"%s"' % c for c in cols), table)
        args = ()
        if site is not None:
            q += " WHERE site = ?"
            args = (site,)
        kidx = T.key_index(table)
        out = {}
        dup = 0
        for r in db.execute(q, args):
            k = tuple(r[i] for i in kidx)
            if k in out:
                dup += 1
            out[k] = tuple(r)
        return out, dup
    finally:
        db.close()


def count(db_path, sql, args=()):
    try:
        db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=5)
    except sqlite3.OperationalError:
        return None
    try:
        return db.execute(sql, args).fetchone()[0]
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


def compare(site_db, central_db, site_id):
    """Per table: rows at the site, rows centrally, missing, extra, differing, duplicated."""
    res = {}
    for t in CHECK_TABLES:
        s, sdup = rows_by_key(site_db, t)
        c, cdup = rows_by_key(central_db, t, site_id) if os.path.exists(central_db) else ({}, 0)
        res[t] = {"site": len(s), "central": len(c), "missing": len(set(s) - set(c)), "extra": len(set(c) - set(s)),
                  "differ": sum(1 for k in s if k in c and s[k] != c[k]), "duplicated": sdup + cdup}
    return res


def in_sync(sites, central_db):
    for st, sid in sites:
        if count(st.db, "SELECT count(*) FROM sink_outbox") != 0:
            return False
        for t in CHECK_TABLES:
            if count(st.db, "SELECT count(*) FROM %s" % t) != count(central_db, "SELECT count(*) FROM %s WHERE site = ?"
                                                                     % t, (sid,)):
                return False
    return True


def wait_sync(sites, central_db, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if in_sync(sites, central_db):
            return True
        time.sleep(0.5)
    return False


def run(workdir, duration=90.0, cut_s=60.0, devices=4, sample_ms=100, seed=1, faults=True, log=print):
    """Returns a result dict; result['ok'] says whether everything was exact."""
    workdir = os.path.abspath(str(workdir))
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(seed)
    cluster = NatsCluster(os.path.join(workdir, "nats"), 3)
    hook = WebhookReceiver(fail=0.5, seed=seed)
    central = os.path.join(workdir, "central.db")
    ids = ("site-a", "site-b")
    proxies, sites, truths = [], [], []
    coll = None
    res = {"ok": False, "faults": []}
    t_start = time.monotonic()
    try:
        cluster.start()
        cluster.wait_ready()
        coll = CollectorProc(workdir, cluster.urls, central)
        coll.start()
        for sid in ids:
            px = LinkProxy(cluster.ports)
            st = Site(os.path.join(workdir, sid), **GW)
            with open(st.gw_conf, "a") as f:
                f.write("\n" + sink_toml(sid, px.urls, hook.url))
            st.start_broker()
            st.start_gateway()
            proxies.append(px)
            sites.append(st)
            truths.append(os.path.join(workdir, sid, "truth.db"))

        def fault(what, **kw):
            ev = dict(kw, what=what, at=round(time.monotonic() - t_start, 1))
            res["faults"].append(ev)
            log("fault: %s" % json.dumps(ev))

        async def nats_kill(at, down):
            await asyncio.sleep(at)
            i = rng.randrange(3)
            fault("kill -9 nats node", node=i, down_s=down)
            cluster.kill(i)
            await asyncio.sleep(down)
            await asyncio.get_running_loop().run_in_executor(None, cluster.start_node, i)

        async def gw_kill(at, down, k):
            await asyncio.sleep(at)
            fault("kill -9 gateway", site=ids[k], down_s=down)
            sites[k].kill_gateway()
            await asyncio.sleep(down)
            sites[k].start_gateway()

        async def coll_kill(at, down):
            await asyncio.sleep(at)
            fault("kill -9 collector", down_s=down)
            coll.kill()
            await asyncio.sleep(down)
            coll.start()

        async def link_cut(at, down, k):
            await asyncio.sleep(at)
            fault("cut link to NATS", site=ids[k], down_s=down)
            proxies[k].down()
            await asyncio.sleep(down)
            proxies[k].up()

        async def main():
            fleets = [Fleet(devices, st.port, tp, seed=seed * 10 + i, sample_ms=sample_ms, window_ms=1000)
                      for i, (st, tp) in enumerate(zip(sites, truths))]
            for fl, st in zip(fleets, sites):
                fl.truth.meta("windows", st.windows)
            try:
                for fl in fleets:
                    await fl.start(stagger_s=0.3)
                evs = []
                if faults:
                    span = max(1.0, duration - cut_s - 2)
                    evs = [nats_kill(rng.uniform(1, duration * 0.6), rng.uniform(2, 5)),
                           gw_kill(rng.uniform(1, duration * 0.6), rng.uniform(1, 3), rng.randrange(2)),
                           coll_kill(rng.uniform(1, duration * 0.6), rng.uniform(1, 3)),
                           link_cut(rng.uniform(1, span), cut_s, rng.randrange(2))]
                sc = asyncio.ensure_future(asyncio.gather(*evs))
                await asyncio.sleep(duration)
                await asyncio.wait_for(sc, cut_s + 30)
                drained = await asyncio.gather(*[fl.quiesce(60) for fl in fleets])
                res["devices_drained"] = all(drained)
                res["fleet"] = [fl.stats() for fl in fleets]
            finally:
                for fl in fleets:
                    await fl.shutdown()
                    fl.truth.close()
            res["fleet_errors"] = [fl.errors for fl in fleets if fl.errors]

        asyncio.run(asyncio.wait_for(main(), duration + cut_s + 180))
        log("traffic done at %.0f s; draining the sink outboxes" % (time.monotonic() - t_start))
        # drain: gateways stopped (final checkpoint), restarted so their sinks send what that
        # checkpoint added, until the outboxes are empty and the collector has everything
        synced = False
        for _ in range(3):
            synced = wait_sync(list(zip(sites, ids)), central, 120)
            for st in sites:
                rc = st.stop_gateway()
                res.setdefault("gateway_rc", []).append(rc)
            if synced and in_sync(list(zip(sites, ids)), central):
                break
            for st in sites:
                st.start_gateway()
        res["synced"] = synced
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len([k for k in hook.applied]) < sum(
                count(st.db, "SELECT (SELECT count(*) FROM cep_events) + (SELECT count(*) FROM anomalies)") or 0
                for st in sites):
            time.sleep(0.5)
        res["collector_rc"] = coll.stop()
        res["drain_s"] = round(time.monotonic() - t_start, 1)
    finally:
        if coll is not None:
            coll.kill()
        for st in sites:
            st.close()
        for px in proxies:
            px.close()
        cluster.stop()
        hook.close()

    ok = bool(res.get("synced")) and res.get("devices_drained", False) and not res.get("fleet_errors")
    res["sites"] = {}
    for st, sid, tp in zip(sites, ids, truths):
        rep = groundtruth.check(st.db, [tp], st.windows)
        cmp_ = compare(st.db, central, sid)
        alerts = set()
        for t in ALERT_TABLES:
            rows, _d = rows_by_key(st.db, t)
            alerts |= {"%s/%s/%s" % (sid, t, "/".join(str(x) for x in k)) for k in rows}
        got = {k for k in hook.applied if k.startswith(sid + "/")}
        dropped = count(st.db, "SELECT count(*) FROM sink_outbox")
        s = {"groundtruth_ok": rep.ok, "groundtruth": rep.text(), "tables": cmp_, "alerts": len(alerts),
             "webhook_applied": len(got), "webhook_missing": len(alerts - got), "webhook_extra": len(got - alerts),
             "outbox_left": dropped}
        res["sites"][sid] = s
        ok = ok and rep.ok and s["webhook_missing"] == 0 and s["webhook_extra"] == 0 and dropped == 0
        ok = ok and all(v["missing"] == 0 and v["extra"] == 0 and v["differ"] == 0 and v["duplicated"] == 0
                        for v in cmp_.values())
    res["central_sites"] = {}
    if os.path.exists(central):
        db = sqlite3.connect(central)
        res["central_sites"] = {r[0]: {"messages": r[1], "rows_new": r[2], "rows_dup_ignored": r[3]}
                                for r in db.execute("SELECT site, messages, rows_new, rows_dup FROM sites")}
        db.close()
    res["webhook"] = {"posts": hook.posts, "applied": len(hook.applied), "duplicates_absorbed": hook.dups,
                      "failed_on_purpose": hook.errors, "stalled_on_purpose": hook.stalls, "no_key": hook.no_key}
    res["nats_kills"] = cluster.kills
    res["collector_kills"] = coll.kills if coll else 0
    res["gateway_kills"] = [st.gw_kills for st in sites]
    res["link_cuts"] = [px.cuts for px in proxies]
    res["ok"] = ok and res["webhook"]["no_key"] == 0
    return res


def report(res):
    lines = ["downstream fault run: %s" % ("EXACT" if res["ok"] else "FAILED")]
    for f in res["faults"]:
        lines.append("  fault at %5.1f s: %s" % (f["at"], json.dumps({k: v for k, v in f.items() if k != "at"})))
    for sid, s in res["sites"].items():
        lines.append("  %s: ground truth %s; central vs site per table (site/central/missing/extra/differ/dup):"
                     % (sid, "OK" if s["groundtruth_ok"] else "FAILED"))
        lines.append("    " + "  ".join("%s %d/%d/%d/%d/%d/%d" % (t, v["site"], v["central"], v["missing"], v["extra"],
                                                                 v["differ"], v["duplicated"])
                                        for t, v in s["tables"].items()))
        lines.append("    alerts %d, applied at the webhook %d, missing %d, extra %d; outbox left %s" % (
            s["alerts"], s["webhook_applied"], s["webhook_missing"], s["webhook_extra"], s["outbox_left"]))
        if not s["groundtruth_ok"]:
            lines.append(s["groundtruth"])
    lines.append("  collector per site: %s" % json.dumps(res["central_sites"]))
    lines.append("  webhook: %s" % json.dumps(res["webhook"]))
    lines.append("  kills: nats %d, collector %d, gateways %s; link cuts %s; devices drained %s; synced %s; %s s" % (
        res["nats_kills"], res["collector_kills"], res["gateway_kills"], res["link_cuts"], res.get("devices_drained"),
        res.get("synced"), res.get("drain_s")))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of device traffic")
    ap.add_argument("--cut", type=float, default=60.0, help="seconds one site's link to NATS stays cut")
    ap.add_argument("--devices", type=int, default=6, help="devices per site")
    ap.add_argument("--sample-ms", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    d = args.dir or os.path.join("var", "sinkfaults-%s" % time.strftime("%Y%m%d-%H%M%S"))
    res = run(d, args.duration, args.cut, args.devices, args.sample_ms, args.seed)
    print(report(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
