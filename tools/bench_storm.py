"""Reconnect-storm benchmark: N devices come back at once, each with a backlog, through the
real broker and the real gateway (subprocess); figures, not a test.

    python tools/bench_storm.py --devices 10000 --backlog 720        # full size (docs/benchmarks.md)
    python tools/bench_storm.py --devices 500 --backlog 100          # quick

The devices are protocol-level replayers (asyncio Protocols, every connection in this one
process), driven by the wire contract exactly as the firmware's uplink (docs/firmware.md,
"Uplink protocol"): connect with a last will, subscribe to its ack topic and the gateway
state, announce online (retained), wait for the retained gateway state, send a hello with
the backlog, then replay oldest first ONLY within the credits the gateway's acks grant
(additive; replay=0 holds), up to 50 readings per message, QoS 1; trim on acks; if acks make
no progress for --resend-s with records outstanding, rewind and send a new hello (dedup
absorbs the duplicates). Connects use exponential backoff with full jitter; the first
connect of each device is spread uniformly over --jitter-s (a real fleet's reconnect).

Measured: drain time (first connect -> last device fully acked, i.e. every record committed
in SQLite), readings/s, peak RSS (VmHWM) and CPU of the gateway, the broker and this process,
then the gateway's database is checked: every (device, boot=1, seq 0..backlog-1) present
exactly once.
"""
import argparse
import asyncio
import os
import platform
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from shared import wire  # noqa: E402
from firmware import mqtt as M  # noqa: E402
from firmware import mqttc as MC  # noqa: E402  (connect-time packets)
from tools.fleet import Site, proc_cpu_s, vm_hwm_kb  # noqa: E402

NOW = int(time.time() * 1000)
KEEPALIVE = 60  # s; a PINGREQ goes out after KEEPALIVE / 2 without sending


class Stats:
    def __init__(self):
        self.connects = self.connect_failures = self.hellos = self.msgs = self.sent = 0
        self.acks = self.credits = self.rewinds = self.done = self.holds = 0
        self.first_connect = None
        self.last_done = None


class Replayer(asyncio.Protocol):
    def __init__(self, bench, dev, idx):
        self.b = bench
        self.dev = dev
        self.idx = idx
        self.t = wire.Topics(bench.prefix)
        self.t_ack = self.t.ack(dev)
        self.t_data = self.t.data(dev)
        self.n = bench.backlog
        self.acked = -1  # every seq <= acked is committed
        self.next = 0  # next seq to replay
        self.credits = 0
        self.replay = False
        self.gw_online = False
        self.tr = None
        self.buf = b""
        self.pid = 0
        self.connected = asyncio.Event()
        self.wake = asyncio.Event()
        self.lost = asyncio.Event()
        self.progress = time.monotonic()
        self.t_base = NOW - self.n * 1000
        self.last_tx = 0.0
        self.last_ack = None
        self.hellos = 0
        self.acks = 0

    # ---- asyncio.Protocol
    def connection_made(self, tr):
        self.tr = tr

    def connection_lost(self, exc):
        self.tr = None
        self.lost.set()
        self.wake.set()

    def data_received(self, data):
        buf = self.buf + data
        off = 0
        n = len(buf)
        while off + 2 <= n:
            first = buf[off]
            ln, mult, o = 0, 1, off + 1
            while True:
                if o >= n:
                    ln = None
                    break
                c = buf[o]
                o += 1
                ln += (c & 0x7F) * mult
                if not c & 0x80:
                    break
                mult *= 128
            if ln is None or o + ln > n:
                break
            self._packet(M.parse(first, buf[o:o + ln]))
            off = o + ln
        self.buf = buf[off:]

    def _packet(self, p):
        k = p[0]
        if k == "connack":
            if p[2] == 0:
                self.connected.set()
        elif k == "publish":
            topic, payload, qos, pid = p[1], p[2], p[3], p[6]
            if qos:
                self.tr.write(M.puback_packet(pid))
            if topic == self.t_ack:
                boot, seq, _gt, credits, replay, flags, _nonce = wire.decode_ack(payload)
                self.b.st.acks += 1
                self.acks += 1
                self.last_ack = time.monotonic()
                if not flags & wire.ACK_NONE and boot == 1 and seq > self.acked:
                    self.acked = seq
                    self.progress = time.monotonic()
                    if self.next <= seq:
                        self.next = seq + 1  # like the outbox: acked records are never replayed
                if replay:
                    self.credits += credits
                    self.b.st.credits += credits
                else:
                    self.credits = 0
                    self.b.st.holds += 1
                self.replay = bool(replay)
            elif topic == self.t.gw_state:
                self.gw_online = wire.decode_state(payload, True)
            self.wake.set()

    # ---- helpers
    def _pid(self):
        self.pid = self.pid % 0xFFFF + 1
        return self.pid

    def _pub(self, topic, payload, retain=False):
        self.tr.write(M.publish_packet(topic, payload, 1, retain, False, self._pid()))
        self.last_tx = time.monotonic()

    def state(self):
        return ("%s acked %d next %d credits %d replay %d gw_online %d connected %d hellos %d acks %d "
                "last ack %s s ago" % (self.dev, self.acked, self.next, self.credits, self.replay, self.gw_online,
                                        self.tr is not None, self.hellos, self.acks,
                                        "%.0f" % (time.monotonic() - self.last_ack) if self.last_ack else "-"))

    def _hello(self):
        first = self.acked + 1
        self._pub(self.t.hello(self.dev), wire.encode_hello(
            self.dev, 1, self.n, int(time.time() * 1000), self.n - first, 1, first, self.idx + 1, self.hellos + 1,
            "bench-storm"))
        self.b.st.hellos += 1
        self.hellos += 1

    def _send(self, k):
        s0 = self.next
        rows = [(s, self.t_base + s * 1000, s % 3, 0, 20000 + (s * 37 + self.idx) % 5000) for s in range(s0, s0 + k)]
        self._pub(self.t_data, wire.encode_readings(self.dev, 1, rows))
        self.next += k
        self.credits -= k
        self.b.st.msgs += 1
        self.b.st.sent += k

    async def run(self):
        b = self.b
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random() * b.jitter)
        attempt = 0
        while self.acked < self.n - 1:
            try:
                self.lost.clear()
                self.connected.clear()
                await asyncio.wait_for(loop.create_connection(
                    lambda: self, "127.0.0.1", b.port, ssl=b.ssl, server_hostname="localhost" if b.ssl else None), 10)
                self.tr.write(MC.connect_packet(self.dev, KEEPALIVE, True, (self.t.state(self.dev),
                                                                      wire.encode_state(False), 1, True),
                                               self.dev if b.ssl else None, b.passwords.get(self.dev)))
                await asyncio.wait_for(self.connected.wait(), 15)
            except (OSError, asyncio.TimeoutError):
                b.st.connect_failures += 1
                if self.tr:
                    self.tr.abort()
                attempt += 1
                await asyncio.sleep(random.random() * min(30.0, 1.0 * 2 ** attempt))
                continue
            b.st.connects += 1
            if b.st.first_connect is None:
                b.st.first_connect = time.monotonic()
            attempt = 0
            await self._session()
        b.st.done += 1
        b.st.last_done = time.monotonic()
        if self.tr is not None:
            self._pub(self.t.state(self.dev), wire.encode_state(False), True)
            self.tr.write(M.DISCONNECT_PACKET)
            self.tr.close()

    async def _session(self):
        b = self.b
        self.tr.write(MC.subscribe_packet(self._pid(), [(self.t_ack, 1), (self.t.gw_state, 1)]))
        self._pub(self.t.state(self.dev), wire.encode_state(True), True)
        self.credits, self.replay, self.gw_online = 0, False, False
        t0 = time.monotonic()
        while not self.gw_online and time.monotonic() - t0 < 0.5 and not self.lost.is_set():
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        self.next = self.acked + 1  # everything unacked is backlog again
        self._hello()
        self.progress = time.monotonic()
        was_online = self.gw_online
        while self.acked < self.n - 1 and not self.lost.is_set():
            if self.gw_online and not was_online:
                self._hello()
            was_online = self.gw_online
            if self.next <= self.acked + 1:
                # nothing outstanding: the resend clock starts at the next send (firmware/uplink.py)
                self.progress = time.monotonic()
            while self.gw_online and self.replay and self.credits > 0 and self.next < self.n:
                self._send(min(self.credits, b.per_msg, self.n - self.next))
            if self.next > self.acked + 1 and time.monotonic() - self.progress > b.resend_s:
                self.next = self.acked + 1
                self.b.st.rewinds += 1
                self._hello()
                self.progress = time.monotonic()
            if self.tr is not None and time.monotonic() - self.last_tx > KEEPALIVE / 2:
                self.tr.write(M.PINGREQ_PACKET)
                self.last_tx = time.monotonic()
            self.wake.clear()
            try:  # acks and the gateway state wake it; the timeout only drives rewinds and pings
                await asyncio.wait_for(self.wake.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        if self.lost.is_set() and self.tr is not None:
            self.tr.abort()


class Bench:
    def __init__(self, port, devices, backlog, per_msg, jitter, resend_s, prefix="edgeflow", broker=None):
        self.port, self.devices, self.backlog, self.per_msg = port, devices, backlog, per_msg
        self.jitter, self.resend_s, self.prefix = jitter, resend_s, prefix
        self.st = Stats()
        self.stall_s = 90.0
        # secure broker: every replayer has its own provisioned credentials and speaks TLS
        self.ssl, self.passwords = None, {}
        if broker is not None and not broker.insecure:
            ids = ["s%05d" % i for i in range(devices)]
            broker.add_devices(ids)
            self.passwords = {d: broker.credentials(d)[1] for d in ids}
            self.ssl = broker.tls_context()

    async def run(self, site, timeout, progress_s=5.0):
        reps = [Replayer(self, "s%05d" % i, i) for i in range(self.devices)]
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(r.run()) for r in reps]
        st = self.st
        total = self.devices * self.backlog
        last = 0
        seen, moved = -1, time.monotonic()
        while time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.5)
            if st.done == self.devices:
                break
            c = sum(r.acked + 1 for r in reps) + st.msgs + st.hellos
            if c != seen:
                seen, moved = c, time.monotonic()
            elif time.monotonic() - moved > self.stall_s:
                print("  no progress for %.0f s: stopping" % self.stall_s)
                break
            if time.monotonic() - last >= progress_s:
                last = time.monotonic()
                committed = sum(r.acked + 1 for r in reps)
                print("  t=%5.1fs connected %d/%d done %d committed %d/%d (%.0f%%) msgs %d rewinds %d "
                      "connect failures %d gateway RSS %s MB" % (
                          time.monotonic() - t0, st.connects, self.devices, st.done, committed, total,
                          100.0 * committed / total, st.msgs, st.rewinds, st.connect_failures,
                          _mb(vm_hwm_kb(site.gateway.pid) if site.gateway else None)), flush=True)
        stuck = [r for r in reps if r.acked < r.n - 1]
        if stuck:
            print("  %d devices not done; e.g.:" % len(stuck))
            for r in stuck[:8]:
                print("    " + r.state())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in reps:
            if r.tr is not None:
                r.tr.abort()
        return t0, sum(r.acked + 1 for r in reps)


def _mb(kb):
    return "-" if kb is None else "%.0f" % (kb / 1024.0)


def machine():
    model = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
        mem = [ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")][0].split()[1]
    except OSError:
        mem = "?"
    try:
        mv = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"], capture_output=True,
                            text=True).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        mv = "?"
    import paho.mqtt
    import sqlite3 as s3
    return ("%d cores (%s), %.1f GB RAM, Linux %s, Python %s, %s, paho-mqtt %s, SQLite %s, ulimit -n %d" % (
        os.cpu_count(), model, int(mem) / 1024.0 / 1024.0 if mem != "?" else 0, platform.release(),
        platform.python_version(), mv, paho.mqtt.__version__, s3.sqlite_version,
        resource.getrlimit(resource.RLIMIT_NOFILE)[0]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=_version_line("bench_storm"))
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--backlog", type=int, default=720, help="backlog readings per device")
    ap.add_argument("--per-msg", type=int, default=50, help="readings per data message (uplink.batch_max)")
    ap.add_argument("--jitter-s", type=float, default=5.0, help="first connects spread over this many seconds")
    ap.add_argument("--resend-s", type=float, default=30.0, help="no ack progress for this long -> rewind")
    ap.add_argument("--replay-rate", type=float, default=None, help="gateway admission.replay_rate (default: "
                                                                    "the gateway's default)")
    ap.add_argument("--max-replayers", type=int, default=None, help="gateway admission.max_replayers")
    ap.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--stall-s", type=float, default=90, help="stop when nothing moved for this long")
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--insecure", action="store_true", help="plaintext anonymous broker (to compare with TLS)")
    a = ap.parse_args(argv)
    need = a.devices + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
        except (ValueError, OSError):
            pass
    d = a.dir or tempfile.mkdtemp(prefix="edgeflow-storm-")
    adm = {}
    if a.replay_rate:
        adm["replay_rate"] = a.replay_rate
    if a.max_replayers:
        adm["max_replayers"] = a.max_replayers
    extra = {"store": {"synchronous": a.synchronous}, "log": {"level": "warning"},
             "dedup": {"max_boots": 4}}
    if adm:
        extra["admission"] = adm
    site = Site(d, window_ms=60000, lateness_ms=60000, ooo_ms=5000, idle_ms=60000, groups=False, gw_extra=extra,
                insecure=a.insecure)
    print("bench_storm: %d devices x %d backlog readings = %d readings, %d per message" % (
        a.devices, a.backlog, a.devices * a.backlog, a.per_msg))
    print("machine: %s" % machine())
    rc = 1
    try:
        site.start_broker()
        bench = Bench(site.port, a.devices, a.backlog, a.per_msg, a.jitter_s, a.resend_s, broker=site.mq)
        site.start_gateway()
        time.sleep(1.5)
        bench.stall_s = a.stall_s
        cpu0 = time.process_time()
        t0, committed = asyncio.run(bench.run(site, a.timeout))
        st = bench.st
        t_first = st.first_connect or t0
        drain = (st.last_done or time.monotonic()) - t_first
        gw_kb, br_kb = vm_hwm_kb(site.gateway.pid), vm_hwm_kb(site.broker.pid)
        gw_cpu, br_cpu = proc_cpu_s(site.gateway.pid), proc_cpu_s(site.broker.pid)
        me_cpu = time.process_time() - cpu0
        me_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = a.devices * a.backlog
        rcg = site.stop_gateway(120)
        # ---- the database
        db = sqlite3.connect(site.db)
        rows, distinct = db.execute("SELECT count(*), count(DISTINCT device || ':' || boot || ':' || seq) "
                                    "FROM readings").fetchone()
        bad = db.execute("SELECT count(*) FROM (SELECT device, count(*) n, min(seq) lo, max(seq) hi "
                         "FROM readings GROUP BY device) WHERE n != ? OR lo != 0 OR hi != ?",
                         (a.backlog, a.backlog - 1)).fetchone()[0]
        ndev = db.execute("SELECT count(DISTINCT device) FROM readings").fetchone()[0]
        dups = db.execute("SELECT coalesce(sum(duplicates), 0) FROM devices").fetchone()[0]
        wins = db.execute("SELECT count(*) FROM window_results").fetchone()[0]
        quar = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        db.close()
        missing = total - distinct  # not in the database: still on the devices (they never got to send it)
        dup_rows = rows - distinct
        print()
        print("drain time: %.1f s (first connect -> every device's last record acked = committed)" % drain)
        print("throughput: %.0f readings/s committed end to end" % (committed / drain if drain else 0))
        print("devices done: %d/%d; connects %d (failures %d, retried with jittered backoff); hellos %d; "
              "data msgs %d; rewinds %d; acks %d; credit holds %d" % (
                  st.done, a.devices, st.connects, st.connect_failures, st.hellos, st.msgs, st.rewinds, st.acks,
                  st.holds))
        print("peak RSS (VmHWM): gateway %s MB, broker %s MB, replayers (this process) %.0f MB" % (
            _mb(gw_kb), _mb(br_kb), me_kb / 1024.0))
        print("CPU: gateway %.1f s, broker %.1f s, replayers %.1f s" % (gw_cpu or 0, br_cpu or 0, me_cpu))
        print("database: %d readings rows, %d distinct identities, %d devices incomplete, "
              "missing %d (still held by devices that did not finish), duplicated rows %d, duplicates absorbed "
              "by dedup %d, window results %d, quarantined %d"
              % (rows, distinct, bad, missing, dup_rows, dups, wins, quar))
        ok = missing == 0 and dup_rows == 0 and bad == 0 and ndev == a.devices and rcg == 0
        print("RESULT: %s" % ("OK (0 lost, 0 duplicated)" if ok else
                              "FAILED (%d devices stalled with %d records undelivered, %d duplicated rows)"
                              % (a.devices - st.done, missing, dup_rows)))
        rc = 0 if ok else 1
    finally:
        site.close()
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    return rc



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
