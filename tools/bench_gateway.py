"""Gateway throughput: broker -> gateway -> committed SQLite, next to a paho-only subscriber.

    python tools/bench_gateway.py [--batched-msgs 20000] [--single-msgs 60000] [--devices 100]

Starts its own mosquitto (tools/brokerconf.py) on a free loopback port. Each
scenario first registers the subscriber's persistent session, then preloads
the broker with the whole stream (QoS 1, a raw-socket publisher so the
producer is not the bottleneck), then starts the subscriber and times the
drain: for the gateway until every record is in a committed transaction (its
acks sent), for the paho-only subscriber until it has counted every message.
Prints figures; it is not a test.
"""
import argparse
import asyncio
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from gateway.service import Gateway  # noqa: E402
from shared import wire  # noqa: E402
from tools.broker import Mosquitto  # noqa: E402

T0 = 1767225600000


def start_broker(tmp):
    # plaintext and anonymous on purpose: this measures the gateway's data path (a raw-socket
    # publisher); the cost of TLS + credentials is measured by tools/bench_storm.py (--insecure vs not)
    b = Mosquitto(tmp, persistence=False, insecure=True).start()
    return b, b.port


def _varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def raw_publish(port, msgs, client_id="bench-pub"):
    """Publish (topic, payload) at QoS 1 over a raw socket; waits for every PUBACK."""
    s = socket.create_connection(("127.0.0.1", port))
    var = _str("MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + _str(client_id)
    s.sendall(b"\x10" + _varint(len(var)) + var)
    assert s.recv(4)[:2] == b"\x20\x02"
    acked = [0]

    def reader():
        buf = b""
        while acked[0] < len(msgs):
            data = s.recv(65536)
            if not data:
                return
            buf += data
            k = len(buf) // 4
            acked[0] += k
            buf = buf[4 * k:]

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    chunk = bytearray()
    for i, (topic, payload) in enumerate(msgs):
        mid = i % 65535 + 1
        body = _str(topic) + struct.pack(">H", mid) + payload
        chunk += b"\x32" + _varint(len(body)) + body
        if len(chunk) > 262144:
            deadline = time.time() + 60
            while i - acked[0] > 20000 and time.time() < deadline:  # packet ids unique among unacked ones
                time.sleep(0.001)
            s.sendall(chunk)
            chunk = bytearray()
    s.sendall(chunk)
    t.join(120)
    s.sendall(b"\xe0\x00")
    s.close()
    return acked[0]


def workload(devices, n_msgs, per_msg, prefix="edgeflow"):
    topics = wire.Topics(prefix)
    out = []
    seqs = [0] * devices
    for i in range(n_msgs):
        d = i % devices
        dev = "dev%04d" % d
        s0 = seqs[d]
        rs = [(s0 + j, T0 + (s0 + j) * 10, j % 4, 0, 20000 + (s0 + j) % 1000) for j in range(per_msg)]
        seqs[d] += per_msg
        out.append((topics.data(dev), wire.encode_readings(dev, 1, rs)))
    return out


def gateway_cfg(port, db, sync):
    return {"mqtt": {"port": port, "client_id": "bench-gw", "queue_size": 1000},
            "store": {"path": db, "synchronous": sync, "retain_readings": os.environ.get("BENCH_RETAIN", "1") == "1"},
            "metrics": {"port": 0}, "security": {"insecure": True},
            "checkpoint": {"interval_ms": 100, "max_messages": 400, "max_records": 50000},
            "windows": {"size_ms": 10000, "groups": [{"name": "all0", "devices": ["*"], "channel": 0}]}}


async def _run_gateway(cfg, until_readings=None, register_only=False, ingest_factory=None):
    gw = Gateway(cfg, ingest_factory=ingest_factory)
    task = asyncio.ensure_future(gw.run())
    while gw.ingest is None or not gw.ingest.connected.is_set():
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    if register_only:
        await asyncio.sleep(0.3)
        gw.stop()
        await task
        return None
    t0 = time.perf_counter()
    last_change, last_n = time.perf_counter(), -1
    while True:
        await asyncio.sleep(0.002)
        if gw.stats.readings != last_n:
            last_change, last_n = time.perf_counter(), gw.stats.readings
        elif time.perf_counter() - last_change > 10:
            raise RuntimeError("stalled at %d of %d readings (queue %d, paused %s)" % (
                last_n, until_readings, gw.queue_depth(), gw.ingest.paused) + " %r %r %r" % (
                gw._commit_task, len(gw.out.mids), gw.out.records))
        if gw.stats.readings >= until_readings and (gw._commit_task is None or gw._commit_task.done()) \
                and not gw.out.records and not gw.out.mids:
            break
        if task.done():
            task.result()
    dt = time.perf_counter() - t0
    st = gw.stats
    info = {"seconds": dt, "readings": st.readings, "messages": st.messages, "checkpoints": st.checkpoints,
            "ckpt_ms_avg": 1000 * st.checkpoint_seconds / max(1, st.checkpoints), "pauses": st.paused,
            "acks": st.acks_sent, "db_mb": gw.store.size_bytes() / 1e6, "t_end": t0 + dt}
    gw.stop()
    await task
    return info


def bench_gateway(port, tmp, name, msgs, n_readings, sync, tweak=None):
    """tweak(cfg): changes the configuration (tools/bench_compare.py)."""
    db = os.path.join(tmp, name + ".db")
    cfg = gateway_cfg(port, db, sync)
    if tweak:
        tweak(cfg)
    cfg["mqtt"]["client_id"] = "bench-gw-" + name
    asyncio.run(_run_gateway(cfg, register_only=True))
    raw_publish(port, msgs, "pub-" + name)
    time.sleep(0.2)
    return asyncio.run(_run_gateway(cfg, until_readings=n_readings))


def bench_paho(port, msgs, name):
    cid = "bench-paho-" + name
    topics = wire.Topics()
    got = [0]
    done = threading.Event()

    def on_connect(c, u, f, rc, p):
        c.subscribe([(topics.sub_data, 1), (topics.sub_hello, 1), (topics.sub_state, 1)])

    def on_message(c, u, m):
        got[0] += 1
        if got[0] >= len(msgs):
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
    c.on_connect = on_connect
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    raw_publish(port, msgs, "pub-" + name)
    time.sleep(0.2)
    done.clear()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(300)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return {"seconds": dt, "messages": got[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=_version_line("bench_gateway"))
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--batched-msgs", type=int, default=20000, help="messages of --per-msg readings")
    ap.add_argument("--per-msg", type=int, default=50)
    ap.add_argument("--single-msgs", type=int, default=60000, help="messages of one reading")
    ap.add_argument("--sync", choices=("FULL", "NORMAL"), default="FULL")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario; the median is reported")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-gw-")
    broker, port = start_broker(tmp)
    try:
        print("mosquitto on 127.0.0.1:%d, QoS 1, %d devices, SQLite synchronous=%s, retain_readings on"
              % (port, args.devices, args.sync))
        msgs = workload(args.devices, args.batched_msgs, args.per_msg)
        n = args.batched_msgs * args.per_msg
        runs = [bench_gateway(port, tmp, "batched%d" % i, msgs, n, args.sync) for i in range(args.repeat)]
        rates = sorted(r["readings"] / r["seconds"] for r in runs)
        r = sorted(runs, key=lambda r: r["readings"] / r["seconds"])[len(runs) // 2]
        print("batched  %d msgs x %d readings: median %8.0f readings/s committed (runs: %s)" % (
            args.batched_msgs, args.per_msg, rates[len(rates) // 2], ", ".join("%.0f" % x for x in rates)))
        print("         median run: %.2f s, %.0f msg/s, %d checkpoints of %.1f ms avg, %d ingest pauses, %.1f MB db"
              % (r["seconds"], r["messages"] / r["seconds"], r["checkpoints"], r["ckpt_ms_avg"], r["pauses"],
                 r["db_mb"]))
        msgs = workload(args.devices, args.single_msgs, 1)
        g = sorted(args.single_msgs / bench_gateway(port, tmp, "single%d" % i, msgs, args.single_msgs,
                                                      args.sync)["seconds"] for i in range(args.repeat))
        p = sorted(args.single_msgs / bench_paho(port, msgs, "single%d" % i)["seconds"] for i in range(args.repeat))
        gr, pr = g[len(g) // 2], p[len(p) // 2]
        print("single   %d msgs x 1 reading:  gateway (committed)  median %8.0f msg/s (runs: %s)" % (
            args.single_msgs, gr, ", ".join("%.0f" % x for x in g)))
        print("single   %d msgs x 1 reading:  paho-only counter    median %8.0f msg/s (runs: %s)" % (
            args.single_msgs, pr, ", ".join("%.0f" % x for x in p)))
        print("ratio gateway / paho-only: %.2f" % (gr / pr))
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    main()
