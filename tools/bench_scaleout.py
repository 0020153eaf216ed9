"""Benchmark: one site on a NATS JetStream cluster (MQTT) vs the default mosquitto, in one run.

    python -m tools.bench_scaleout                  # ~4 min on 2 cores
    python -m tools.bench_scaleout --messages 8000 --latency 300
    python -m tools.bench_scaleout --tls --no-latency   # + the secured cluster: TLS / plaintext ratios
    python -m tools.bench_scaleout --replicated --no-latency   # + the replicated checkpoint (separate disks)

1. Throughput: the same reading batches (50 readings per message, like the firmware's
   batch_max) are published at QoS 1 and drained by
     a) one gateway on mosquitto (its persistent session holds the backlog), and
     b) 1 and then 2 gateway processes (gateway/scaleout.py, 8 partitions) on a 3-node
        NATS cluster (the stream holds the backlog; an empty work-queue stream means every
        message was committed and acked).
   Figure: readings committed per second while draining (for the cluster, measured from
   the moment every gateway owns its share of partitions).
2. Latency, 1 message at a time: MQTT publish -> MQTT subscriber on mosquitto, and MQTT
   publish into NATS -> the JetStream pull consumer the gateway uses; and end to end,
   a reading batch published -> the gateway's ack received by the device (commit included).
3. Partition takeover: kill -9 one of 2 gateways, time until its partitions run elsewhere.
"""
import argparse
import asyncio
import glob
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nats  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.ingest_jetstream import STREAM, Link  # noqa: E402
from gateway.partitions import partition_filter  # noqa: E402
from shared import wire  # noqa: E402
from tools.bench_gateway import _run_gateway, gateway_cfg, raw_publish, workload  # noqa: E402
from tools.broker import Mosquitto  # noqa: E402
from tools.natscluster import die_with_parent  # noqa: E402
from tools.fleet import proc_cpu_s  # noqa: E402
from tools.scaleout_site import ScaleSite  # noqa: E402

PY = sys.executable
# the same pipeline settings bench_gateway.py uses for the mosquitto gateway
GW_EXTRA = {"checkpoint": {"interval_ms": 100, "max_messages": 400, "max_records": 50000},
            "mqtt": {"queue_size": 1000}}


def start_broker(tmp):
    """Plain mosquitto: the cluster side has no TLS either, so both sides pay the same."""
    b = Mosquitto(tmp, persistence=False, insecure=True).start()
    return b, b.port


def mosquitto_drain(port, tmp, msgs, n_readings):
    """One gateway on mosquitto: its persistent session holds the published backlog."""
    cfg = gateway_cfg(port, os.path.join(tmp, "mosq.db"), "NORMAL")
    cfg["security"] = {"insecure": True}
    asyncio.run(_run_gateway(cfg, register_only=True))
    raw_publish(port, msgs, "pub-mosq")
    time.sleep(0.2)
    return asyncio.run(_run_gateway(cfg, until_readings=n_readings))


def _nats_kw(site):
    """nats.connect() options of the site's gateway (TLS + credentials when secured)."""
    from gateway.config import Config
    from gateway.ingest_jetstream import Security
    return Security(Config.load(site.conf)).nats_options()


async def _stream_msgs(site):
    nc = await nats.connect(site.cluster.urls, **_nats_kw(site))
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.messages
    finally:
        await nc.close()


async def _ensure_stream(site):
    link = Link(site.cluster.urls, [("127.0.0.1", site.mqtt_ports[0])], "bench-setup")
    link.nc = await nats.connect(site.cluster.urls, **_nats_kw(site))
    link.js = link.nc.jetstream(timeout=10)
    await link.ensure_stream()
    await link.nc.close()


BENCH_USER = "edgeflow-bench"


def tls_publish(site, msgs):
    """QoS 1 over TLS as a provisioned service user (the devices' topics), every PUBACK awaited."""
    import ssl
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=BENCH_USER)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.username_pw_set(BENCH_USER, site.fleet.service_password(BENCH_USER))
    c.tls_set_context(ssl.create_default_context(cafile=site.fleet.path("ca", "ca.pem")))
    c.connect("127.0.0.1", site.mqtt_ports[0])
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(60)
    c.loop_stop()
    c.disconnect()


def cluster_drain(tmp, msgs, n_readings, gateways, partitions=8, tls=False, checkpoint="shared"):
    """tls: the secured site (TLS everywhere, users); else plaintext like the mosquitto baseline.
    checkpoint "replicated": each gateway its own directory, every commit's delta to JetStream
    (the production snapshot threshold, 8 MiB)."""
    # secured: the workload's devices provisioned (the gateway quarantines unknown ids)
    devs = sorted({wire.Topics("edgeflow").parse(t)[0] for t, _p in msgs}) if tls else ()
    site = ScaleSite(os.path.join(tmp, "cluster-g%d%s-%s" % (gateways, "-tls" if tls else "", checkpoint)),
                     partitions=partitions, gw_extra=GW_EXTRA, insecure=not tls, devices=devs, checkpoint=checkpoint,
                     snapshot_min_bytes=8 << 20)
    if tls:
        from tools import natsauth
        site.fleet.add_service(BENCH_USER, "readwrite")
        natsauth.refresh(site.fleet)
    site.start()
    try:
        asyncio.run(_ensure_stream(site))
        t0 = time.perf_counter()
        if tls:
            tls_publish(site, msgs)
        else:
            raw_publish(site.mqtt_ports[0], msgs, "bench-pub")
        pub_s = time.perf_counter() - t0
        deadline = time.time() + 60
        while asyncio.run(_stream_msgs(site)) < len(msgs) and time.time() < deadline:
            time.sleep(0.2)
        stored = asyncio.run(_stream_msgs(site))
        gids = ["g%d" % i for i in range(gateways)]
        for g in gids:
            site.start_gateway(g)
        # measure from the moment each gateway owns its share
        while True:
            own = site.owners()
            counts = [list(own.values()).count(g) for g in gids]
            if len(own) == partitions and max(counts) - min(counts) <= 1:
                break
            time.sleep(0.05)
        procs = {"nats": [p for p in site.cluster.procs if p], "gateways": [site.gws[g] for g in gids]}
        cpu0 = {k: sum(proc_cpu_s(p.pid) or 0 for p in v) for k, v in procs.items()}
        left0, t1 = asyncio.run(_stream_msgs(site)), time.perf_counter()
        left, t2 = left0, t1
        while left > 0 and time.perf_counter() - t1 < 300:
            time.sleep(0.25)
            left, t2 = asyncio.run(_stream_msgs(site)), time.perf_counter()
        cpu = {k: (sum(proc_cpu_s(p.pid) or 0 for p in v) - cpu0[k]) / max(1e-9, t2 - t1) for k, v in procs.items()}
        committed = _count_readings(site)
        rate = (left0 - left) * (n_readings / len(msgs)) / max(1e-9, t2 - t1)
        res = {"gateways": gateways, "published_s": pub_s, "stored_msgs": stored, "left_at_balance": left0,
               "drain_s": t2 - t1, "readings_per_s": rate, "committed_readings": committed, "left": left,
               "cpu_nats": cpu["nats"], "cpu_gateways": cpu["gateways"]}
        if checkpoint != "shared":  # what the replicated checkpoint appended
            time.sleep(0.5)
            m = [site.scrape(g) for g in gids]
            res["ckpt_deltas"] = sum(v for x in m for k, v in x.items() if k[0].endswith("partition_ckpt_deltas_total"))
            res["ckpt_bytes"] = sum(v for x in m for k, v in x.items() if k[0].endswith("partition_ckpt_bytes_total"))
            res["ckpt_snapshots"] = sum(v for x in m for k, v in x.items()
                                        if k[0].endswith("partition_ckpt_snapshots_total"))
        takeover = None
        if gateways >= 2:
            takeover = _takeover(site, gids)
        for g in gids:
            site.stop_gateway(g)
        return res, takeover
    finally:
        site.close()


def _count_readings(site):
    if site.checkpoint == "shared":
        files = glob.glob(os.path.join(site.parts_dir, "part-*.db"))
    else:  # each partition's file at its (last) owner
        files = [os.path.join(site.gw_dir(g), "part-%03d.db" % p) for p, g in site.last_owners().items()]
    n = 0
    for p in files:
        c = sqlite3.connect(p)
        n += c.execute("SELECT count(*) FROM readings").fetchone()[0]
        c.close()
    return n


def _takeover(site, gids):
    owned = {p for p, g in site.owners().items() if g == gids[0]}
    t_kill = time.time()
    site.kill_gateway(gids[0])
    asyncio.run(site.wait_owned(gids[1:], 60))
    s, _ = site.takeover_s(owned, t_kill)
    out = {"partitions_moved": len(owned), "takeover_s": s, "lease_s": site.lease_s}
    if site.checkpoint != "shared":  # the survivors rebuilt them from JetStream
        ev = [e for g in gids[1:] for e in site.events(g, "partition_checkpoint") if e["ts"] > t_kill
              and e["partition"] in owned]
        out["rebuilds"] = [(e["s"], e["db_bytes"], e["snapshot_bytes"], e["deltas"], e["delta_bytes"]) for e in ev]
    return out


# ---------------------------------------------------------------- latency

class _Echo:
    """paho subscriber that records when each numbered message arrives."""

    def __init__(self, port, topic):
        self.got = {}
        self.ev = threading.Event()
        c = self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lat-sub-%d" % port)
        c.on_message = self._msg
        c.connect("127.0.0.1", port)
        c.subscribe(topic, 1)
        c.loop_start()

    def _msg(self, c, u, m):
        self.got[int(m.payload.split(b":")[0])] = time.perf_counter()
        self.ev.set()

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _pub_client(port, cid):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    while not c.is_connected():
        time.sleep(0.01)
    return c


def mosquitto_latency(port, n):
    sub = _Echo(port, "lat/x")
    time.sleep(0.3)
    pub = _pub_client(port, "lat-pub")
    out = []
    for i in range(n):
        t = time.perf_counter()
        pub.publish("lat/x", b"%d:" % i + b"x" * 600, qos=1)
        deadline = t + 5
        while i not in sub.got and time.perf_counter() < deadline:
            sub.ev.wait(0.01)
            sub.ev.clear()
        if i in sub.got:
            out.append(sub.got[i] - t)
    pub.loop_stop()
    pub.disconnect()
    sub.close()
    return out


async def _nats_latency(site, n):
    """MQTT publish into NATS -> the partition's JetStream pull consumer (fetch loop)."""
    from nats.js.api import AckPolicy, ConsumerConfig
    nc = await nats.connect(site.cluster.urls)
    js = nc.jetstream()
    dev = "lat-0"
    from gateway.partitions import partition_of
    p = partition_of(dev, site.P)
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="lat", filter_subject=partition_filter("edgeflow", p),
                                                 ack_policy=AckPolicy.EXPLICIT))
    sub = await js.pull_subscribe(partition_filter("edgeflow", p), durable="lat", stream=STREAM)
    got = {}
    stop = False

    async def reader():
        while not stop:
            try:
                ms = await sub.fetch(256, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            now = time.perf_counter()
            for m in ms:
                got[int(m.data.split(b":")[0])] = now
                await m.ack()

    rt = asyncio.ensure_future(reader())
    pub = _pub_client(site.mqtt_ports[0], "lat-pub-nats")
    out = []
    topic = wire.Topics("edgeflow").data(dev)
    for i in range(n):
        t = time.perf_counter()
        pub.publish(topic, b"%d:" % i + b"x" * 600, qos=1)
        deadline = t + 5
        while i not in got and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
        if i in got:
            out.append(got[i] - t)
    stop = True
    await rt
    pub.loop_stop()
    pub.disconnect()
    await js.delete_consumer(STREAM, "lat")
    await nc.close()
    return out


def ack_latency(port, n, dev="ack-0"):
    """A reading batch published -> the gateway's ack covering it received (end to end)."""
    topics = wire.Topics("edgeflow")
    acks = {}
    ev = threading.Event()

    def on_msg(c, u, m):
        seq = wire.decode_ack(m.payload)[1]
        acks[seq] = time.perf_counter()
        ev.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-" + dev)
    c.on_message = on_msg
    c.connect("127.0.0.1", port)
    c.subscribe(topics.ack(dev), 1)
    c.loop_start()
    time.sleep(0.5)
    now = int(time.time() * 1000)
    c.publish(topics.hello(dev), wire.encode_hello(dev, 1, 0, now, 0, 1, 0, 7, 1, "bench"), qos=1)
    time.sleep(0.5)
    out = []
    seq = 0
    for i in range(n):
        rs = [(seq + j, now + seq + j, 0, 0, 2000 + j) for j in range(16)]
        last = seq + 15
        seq += 16
        t = time.perf_counter()
        c.publish(topics.data(dev), wire.encode_readings(dev, 1, rs), qos=1)
        deadline = t + 5
        while not any(s >= last for s in list(acks)) and time.perf_counter() < deadline:
            ev.wait(0.005)
            ev.clear()
        hit = [acks[s] for s in list(acks) if s >= last]
        if hit:
            out.append(min(hit) - t)
        acks.clear()
        time.sleep(0.12)  # past the gateway's per-device ack interval (100 ms)
    c.loop_stop()
    c.disconnect()
    return out


def _q(xs):
    if not xs:
        return "n=0"
    xs = sorted(xs)
    return "median %.2f ms, p99 %.2f ms (n=%d)" % (1000 * statistics.median(xs), 1000 * xs[int(0.99 * (len(xs) - 1))],
                                                   len(xs))


def latency(tmp, n, n_ack):
    from tools.fleet import gateway_toml
    res = {}
    b, port = start_broker(os.path.join(tmp, "lat-mosq"))
    gw = None
    try:
        res["mosquitto mqtt->mqtt"] = _q(mosquitto_latency(port, n))
        conf = os.path.join(tmp, "lat-gw.toml")
        with open(conf, "w") as f:
            f.write(gateway_toml(port, os.path.join(tmp, "lat-gw.db"), groups=False,
                                 extra=dict(GW_EXTRA, store={"synchronous": "NORMAL"}, security={"insecure": True})))
        gw = subprocess.Popen([PY, "-m", "gateway.cli", "run", "-c", conf], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        time.sleep(1.5)
        res["mosquitto + gateway, batch -> ack"] = _q(ack_latency(port, n_ack))
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(10)
        b.stop()
    site = ScaleSite(os.path.join(tmp, "lat-cluster"), partitions=8, gw_extra=GW_EXTRA, insecure=True).start()
    try:
        asyncio.run(_ensure_stream(site))
        res["nats mqtt->jetstream consumer"] = _q(asyncio.run(_nats_latency(site, n)))
        site.start_gateway("g0")
        asyncio.run(site.wait_owned(["g0"]))
        res["nats cluster + 1 gateway, batch -> ack"] = _q(ack_latency(site.mqtt_ports[0], n_ack))
        site.stop_gateway("g0")
    finally:
        site.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000, help="messages of 50 readings for the throughput runs")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--latency", type=int, default=500, help="messages for the broker latency")
    ap.add_argument("--ack-latency", type=int, default=100, help="batches for the end-to-end ack latency")
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs (medians printed)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tls", action="store_true",
                    help="also drain the secured cluster (TLS everywhere, users) with 1 and 2 gateways")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency part")
    ap.add_argument("--replicated", action="store_true",
                    help="also drain with the replicated checkpoint (gateways on separate disks) with 1 and 2 "
                    "gateways: throughput / shared files, bytes per commit, takeover by rebuild")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-scaleout-")
    per = 50
    msgs = workload(args.devices, args.messages, per)
    n = args.messages * per
    print("workload: %d messages x %d readings, %d devices; %d cores" % (args.messages, per, args.devices,
                                                                         os.cpu_count()))
    try:
        takeover = None
        rates = {"mosquitto, 1 gateway": [], "NATS cluster, 1 gateway": [], "NATS cluster, 2 gateways": []}
        if args.tls:
            rates.update({"NATS TLS, 1 gateway": [], "NATS TLS, 2 gateways": []})
        modes = [(False, "shared")] + ([(True, "shared")] if args.tls else []) + \
            ([(False, "replicated")] if args.replicated else [])
        if args.replicated:
            rates.update({"NATS replicated, 1 gateway": [], "NATS replicated, 2 gateways": []})
        ckpt_takeover = None
        for rep in range(args.repeat):
            b, port = start_broker(os.path.join(tmp, "mosq%d" % rep))
            try:
                m = mosquitto_drain(port, os.path.join(tmp, "mosq%d" % rep), msgs, n)
            finally:
                b.stop()
            rates["mosquitto, 1 gateway"].append(m["readings"] / m["seconds"])
            print("  run %d mosquitto, 1 gateway: %.0f readings/s committed (%.1f s)"
                  % (rep, m["readings"] / m["seconds"], m["seconds"]))
            for tls, mode in modes:
                for g in (1, 2):
                    r, t = cluster_drain(os.path.join(tmp, "r%d" % rep), msgs, n, g, tls=tls, checkpoint=mode)
                    if mode == "shared":
                        takeover = t or takeover
                    else:
                        ckpt_takeover = t or ckpt_takeover
                    name = "NATS %s, %d gateway%s" % ("TLS" if tls else "cluster" if mode == "shared" else mode, g,
                                                      "s" if g > 1 else "")
                    if "ckpt_bytes" in r:
                        print("  run %d %s: checkpoint deltas %d, %.0f bytes per delta, %.2f bytes per reading, "
                              "snapshots %d" % (rep, name, r["ckpt_deltas"], r["ckpt_bytes"] / max(1, r["ckpt_deltas"]),
                                                r["ckpt_bytes"] / max(1, r["committed_readings"]), r["ckpt_snapshots"]))
                    rates[name].append(r["readings_per_s"])
                    print("  run %d %s: %.0f readings/s committed (%.1f s draining %d of %d "
                          "messages; CPU cores busy: nats-servers %.2f, gateways %.2f; publish into NATS %.1f s; "
                          "%d readings in the partition DBs)"
                          % (rep, name, r["readings_per_s"], r["drain_s"], r["left_at_balance"], r["stored_msgs"],
                             r["cpu_nats"], r["cpu_gateways"], r["published_s"], r["committed_readings"]))
        for k, v in rates.items():
            print("%-26s median %8.0f readings/s committed (runs: %s)" % (k + ":", statistics.median(v),
                                                                           ", ".join("%.0f" % x for x in v)))
        if takeover:
            print("takeover: %d partitions of a killed gateway running elsewhere after %.2f s (lease %.1f s)"
                  % (takeover["partitions_moved"], takeover["takeover_s"] or -1, takeover["lease_s"]))
        if ckpt_takeover:
            print("takeover, replicated checkpoint: %d partitions after %.2f s (lease %.1f s); rebuilds "
                  "(s, file bytes, snapshot bytes, deltas, delta bytes): %s"
                  % (ckpt_takeover["partitions_moved"], ckpt_takeover["takeover_s"] or -1, ckpt_takeover["lease_s"],
                     ckpt_takeover.get("rebuilds")))
        if args.replicated:
            for g in ("1 gateway", "2 gateways"):
                a, b = statistics.median(rates["NATS replicated, " + g]), statistics.median(rates["NATS cluster, " + g])
                print("NATS replicated / shared files, %s: %.2f" % (g, a / b))
        if args.tls:
            for g in ("1 gateway", "2 gateways"):
                a, b = statistics.median(rates["NATS TLS, " + g]), statistics.median(rates["NATS cluster, " + g])
                print("NATS TLS / plaintext, %s: %.2f" % (g, a / b))
        for k, v in ({} if args.no_latency else latency(tmp, args.latency, args.ack_latency)).items():
            print("latency %-40s %s" % (k + ":", v))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
