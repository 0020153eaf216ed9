"""Reconnect-storm benchmark: N devices come back at once, each with a backlog, through the
real broker and the real gateway (subprocess); figures, not a test.

    python tools/bench_storm.py --devices 10000 --backlog 720        # full size (docs/benchmarks.md)
    python tools/bench_storm.py --devices 500 --backlog 100          # quick

A steady phase before the storm and another after it (same broker, same gateway process,
same protocol client; on a shared machine the load changes, so the storm is bracketed):
--steady-devices already connected devices send live records (no backlog, so no credits), 50
per message, each keeping at most --steady-window unacked, until --steady-readings are
committed. The last line prints storm / steady (the mean of the two), by wall clock and by the
gateway's CPU per reading (goal 3 of issue 16: >= 0.8). --steady-readings 0 skips them.

    python tools/bench_storm.py --devices 10000 --backlog 720 --rounds 5   # the figure: the median

--rounds N runs the whole bench N times, each round in a fresh process with its own broker,
gateway and database, and prints the median of the rounds' ratios: on this 2-core box, which also
runs the 10,000 stand-ins, single runs spread by about 0.1 either way (docs/benchmarks.md,
section 3), so one run is not the figure.

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
exactly once. Where the wall time went: per phase the CPU share of each process and the share of
the wall time its main thread waited for a CPU (2 shared cores), how late the replayers' own loop
ran, the devices' CONNACK waits and the connects the broker's listen queue dropped
(docs/benchmarks.md section 3, run I).
"""
import argparse
import asyncio
import contextlib
import gc
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import struct
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
from tools.proc import exit_on_sigterm, popen  # noqa: E402

NOW = int(time.time() * 1000)
KEEPALIVE = 60  # s; a PINGREQ goes out after KEEPALIVE / 2 without sending
_PACKS = {}  # k -> (struct.Struct of k readings (wire_dev._READING each), the columns that do not vary)
# value of seq s on device idx: 20000 + (37 s + idx) % 5000; 37 and 5000 are coprime, so k values are one
# stride-37 slice of this list (C speed) starting at (37 s0 + idx) % 5000
_VALUES = []


def encode_batch(dev, idx, t_base, s0, k):
    """wire.encode_readings(dev, 1, rows) of the bench's rows s0..s0+k-1, in one pack built from
    slices: the replayers share the 2 cores with the broker and the gateway, and building the
    pack's arguments reading by reading was the largest part of their CPU in the connect burst
    (py-spy), CPU the gateway then lacked. main() checks the bytes equal wire.encode_readings'."""
    out, off = wire.readings_buffer(dev, 1, s0, t_base + s0 * 1000, k)
    pk = _PACKS.get(k)
    if pk is None:
        _VALUES[len(_VALUES):] = [20000 + j % 5000 for j in range(len(_VALUES), 5000 + 37 * k)]
        flat = [0] * (5 * k)
        flat[0::5] = range(k)
        flat[1::5] = range(0, 1000 * k, 1000)
        pk = _PACKS[k] = (struct.Struct(">" + "HiBBi" * k), flat,
                          [[(s + i) % 3 for i in range(k)] for s in range(3)])  # channel = seq % 3
    st, flat, chans = pk
    flat = flat[:]
    flat[2::5] = chans[s0 % 3]
    v0 = (37 * s0 + idx) % 5000
    flat[4::5] = _VALUES[v0:v0 + 37 * k:37]
    st.pack_into(out, off, *flat)
    return bytes(out)


def _rows(idx, t_base, s0, k):
    return [(s, t_base + s * 1000, s % 3, 0, 20000 + (s * 37 + idx) % 5000) for s in range(s0, s0 + k)]


async def _wait(ev, timeout):
    """ev.wait() for at most timeout s; cheaper than asyncio.wait_for (no task per wait,
    10,000 devices wait a few times a second each). The timeout sets ev."""
    h = asyncio.get_running_loop().call_later(timeout, ev.set)
    try:
        await ev.wait()
    finally:
        h.cancel()


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
        self.wake = asyncio.Event()
        self.lost = asyncio.Event()
        self.progress = time.monotonic()
        self.t_base = NOW - self.n * 1000
        self.last_tx = 0.0
        self.last_ack = None
        self.hellos = 0
        self.acks = 0
        self.t_try = self.t_connack = None  # first connect attempt, first CONNACK (monotonic)
        self.connack = None  # the connect attempt in progress: True on CONNACK 0, False after 15 s
        self.pubacks = []  # PUBACKs owed for the packets of the read in progress
        self.live = False  # steady phase: everything is live data (hello backlog 0), no credits

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
        if self.pubacks:  # one write for the PUBACKs of what this read brought, not one each
            if self.tr is not None:
                self.tr.write(b"".join(self.pubacks))
            self.pubacks = []

    def _packet(self, p):
        k = p[0]
        if k == "connack":
            if p[2] == 0:
                self._connack_done(True)
        elif k == "publish":
            topic, payload, qos, pid = p[1], p[2], p[3], p[6]
            if qos:
                self.pubacks.append(M.puback_packet(pid))
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
    def _connack_done(self, ok):
        if self.connack is not None and not self.connack.done():
            self.connack.set_result(ok)

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
        nxt = first if self.live else self.n  # live: nothing below `first` is held, nothing is backlog
        self._pub(self.t.hello(self.dev), wire.encode_hello(
            self.dev, 1, nxt, int(time.time() * 1000), nxt - first, 1, first, self.idx + 1, self.hellos + 1,
            "bench-storm"))
        self.b.st.hellos += 1
        self.hellos += 1

    def _send(self, k, out):
        """Appends the publish of the next k records to out (written at once by the caller)."""
        s0 = self.next
        out.append(M.publish_packet(self.t_data, encode_batch(self.dev, self.idx, self.t_base, s0, k), 1, False,
                                    False, self._pid()))
        self.next += k
        self.credits -= k
        self.b.st.msgs += 1
        self.b.st.sent += k

    async def run(self):
        b = self.b
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random() * b.jitter)
        self.t_try = time.monotonic()  # its first connect attempt
        attempt = 0
        while self.acked < self.n - 1:
            try:
                self.lost.clear()
                await asyncio.wait_for(loop.create_connection(
                    lambda: self, "127.0.0.1", b.port, ssl=b.ssl, server_hostname="localhost" if b.ssl else None), 10)
                self.tr.write(MC.connect_packet(self.dev, KEEPALIVE, True, (self.t.state(self.dev),
                                                                      wire.encode_state(False), 1, True),
                                               self.dev if b.ssl else None, b.passwords.get(self.dev)))
                # the CONNACK or 15 s, whichever first (as before, without a task per wait)
                self.connack = loop.create_future()
                h = loop.call_later(15, self._connack_done, False)
                try:
                    if not await self.connack:
                        raise asyncio.TimeoutError
                finally:
                    h.cancel()
            except (OSError, asyncio.TimeoutError):
                b.st.connect_failures += 1
                if self.tr:
                    self.tr.abort()
                attempt += 1
                await asyncio.sleep(random.random() * min(30.0, 1.0 * 2 ** attempt))
                continue
            b.st.connects += 1
            if self.t_connack is None:
                self.t_connack = time.monotonic()
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
            await _wait(self.wake, 0.5)
        self.next = self.acked + 1  # everything unacked is backlog again
        self._hello()
        self.progress = time.monotonic()
        was_online = self.gw_online
        if self.live:
            b.ready += 1
            await b.go.wait()
        while self.acked < self.n - 1 and not self.lost.is_set():
            if self.gw_online and not was_online:
                self._hello()
            was_online = self.gw_online
            if self.next <= self.acked + 1:
                # nothing outstanding: the resend clock starts at the next send (firmware/uplink.py)
                self.progress = time.monotonic()
            out = []
            if self.live:
                while self.gw_online and self.next < self.n and self.next - self.acked - 1 < b.window:
                    self._send(min(b.per_msg, self.n - self.next), out)
            while self.gw_online and self.replay and self.credits > 0 and self.next < self.n:
                self._send(min(self.credits, b.per_msg, self.n - self.next), out)
            if out:  # one write (one syscall) for what this wake-up sends, not one per message
                self.tr.write(b"".join(out))
                self.last_tx = time.monotonic()
            if self.next > self.acked + 1 and time.monotonic() - self.progress > b.resend_s:
                self.next = self.acked + 1
                self.b.st.rewinds += 1
                self._hello()
                self.progress = time.monotonic()
            if self.tr is not None and time.monotonic() - self.last_tx > KEEPALIVE / 2:
                self.tr.write(M.PINGREQ_PACKET)
                self.last_tx = time.monotonic()
            self.wake.clear()
            await _wait(self.wake, 5.0)  # acks and the gateway state wake it; the timeout: rewinds, pings
        if self.lost.is_set() and self.tr is not None:
            self.tr.abort()


class Bench:
    def __init__(self, port, devices, backlog, per_msg, jitter, resend_s, prefix="edgeflow", broker=None,
                 steady_devices=0):
        self.port, self.devices, self.backlog, self.per_msg = port, devices, backlog, per_msg
        self.jitter, self.resend_s, self.prefix = jitter, resend_s, prefix
        self.st = Stats()
        self.stall_s = 90.0
        self.window = 1000  # live records a steady-phase device keeps unacked
        self.metrics_port = 0
        self.go = asyncio.Event()
        self.ready = 0
        # secure broker: every replayer has its own provisioned credentials and speaks TLS
        self.ssl, self.passwords = None, {}
        if broker is not None and not broker.insecure:
            ids = ["s%05d" % i for i in range(devices)] + ["%s%05d" % (p, i) for p in "lm"
                                                             for i in range(steady_devices)]
            broker.add_devices(ids)
            self.passwords = {d: broker.credentials(d)[1] for d in ids}
            self.ssl = broker.tls_context()

    async def steady(self, site, n_dev, per_dev, timeout, prefix="l"):
        """The steady phase: n_dev connected devices send per_dev live records each.
        Returns (seconds from the first send to the last ack, readings committed, gateway CPU s)."""
        saved = self.backlog, self.jitter
        self.st = Stats()
        self.backlog, self.jitter = per_dev, 0.0
        devs = []
        for i in range(n_dev):
            r = Replayer(self, "%s%05d" % (prefix, i), self.devices + i)
            r.live = True
            devs.append(r)
        tasks = [asyncio.ensure_future(r.run()) for r in devs]
        t_end = time.monotonic() + timeout
        while self.ready < n_dev and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the hellos' acks, the connects' state messages
        c0 = (time.monotonic(), _cpus(site))
        w0 = (time.monotonic(), _waits(site))
        cpu0, loop0 = c0[1][0], _loop_cpu_s(site.gateway.pid)
        t0 = time.monotonic()
        self.st.last_done = None
        self.go.set()
        self.ready = 0
        while self.st.done < n_dev and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        dt = (self.st.last_done or time.monotonic()) - t0
        c1 = (time.monotonic(), _cpus(site))
        w1 = (time.monotonic(), _waits(site))
        cpu = c1[1][0] - cpu0
        loop_cpu = _loop_cpu_s(site.gateway.pid) - loop0
        await asyncio.wait(tasks, timeout=5)
        await _end(tasks, devs)
        self.st = Stats()
        self.go = asyncio.Event()
        self.backlog, self.jitter = saved
        return dt, sum(r.acked + 1 for r in devs), cpu, _cpu_shares(c0, c1), loop_cpu, _cpu_shares(w0, w1)

    async def run(self, site, timeout, progress_s=5.0):
        reps = [Replayer(self, "s%05d" % i, i) for i in range(self.devices)]
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(r.run()) for r in reps]
        lag = [0.0]  # the replayers' event loop: worst lateness of a 20 ms timer since the last progress line
        probe = asyncio.ensure_future(_lag_probe(lag))
        st = self.st
        total = self.devices * self.backlog
        last = 0
        seen, moved = -1, time.monotonic()
        cpu_last = (time.monotonic(), _cpus(site))
        wait_last = (time.monotonic(), _waits(site))
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
                now_cpu = (time.monotonic(), _cpus(site))
                now_wait = (time.monotonic(), _waits(site))
                print("  t=%5.1fs connected %d/%d done %d committed %d/%d (%.0f%%) msgs %d rewinds %d "
                      "connect failures %d gateway RSS %s MB | CPU %% gateway/broker/replayers %s, waiting for a CPU %% "
                      "(main threads) %s, replayers' loop late by up to %.0f ms | gauges: %s" % (
                          time.monotonic() - t0, st.connects, self.devices, st.done, committed, total,
                          100.0 * committed / total, st.msgs, st.rewinds, st.connect_failures,
                          _mb(vm_hwm_kb(site.gateway.pid) if site.gateway else None), _cpu_shares(cpu_last, now_cpu),
                          _cpu_shares(wait_last, now_wait), 1000 * lag[0], gateway_gauges(self.metrics_port) if self.metrics_port else "-"), flush=True)
                cpu_last, wait_last = now_cpu, now_wait
                lag[0] = 0.0
        probe.cancel()
        print("  " + connect_spread(reps, t0))
        stuck = [r for r in reps if r.acked < r.n - 1]
        if stuck:
            print("  %d devices not done; e.g.:" % len(stuck))
            for r in stuck[:8]:
                print("    " + r.state())
        await _end(tasks, reps)
        return t0, sum(r.acked + 1 for r in reps)


async def _end(tasks, reps):
    """Cancel the devices' tasks and drop their connections."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in reps:
        if r.tr is not None:
            r.tr.abort()


async def _lag_probe(lag):
    """How late the replayers' loop runs a timer: a device's CONNACK, ack or grant waits as long."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(0.02)
        lag[0] = max(lag[0], loop.time() - t - 0.02)


def connect_spread(reps, t0):
    """When the devices tried their first connect and how long each waited for its CONNACK: a
    full listen queue (the broker's fixed backlog) costs a device 1 s and more."""
    tries = sorted(r.t_try - t0 for r in reps if r.t_try is not None)
    waits = sorted(r.t_connack - r.t_try for r in reps if r.t_connack is not None and r.t_try is not None)
    if not tries or not waits:
        return "connects: -"
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return ("connects: first attempts from %.1f to %.1f s; wait for the CONNACK p50 %.2f p90 %.2f p99 %.2f max %.2f s, "
            "%d devices over 1 s, last CONNACK at %.1f s" % (
                tries[0], tries[-1], q(waits, .5), q(waits, .9), q(waits, .99), waits[-1], sum(1 for w in waits if w > 1),
                max(r.t_connack for r in reps if r.t_connack is not None) - t0))


@contextlib.contextmanager
def no_gc():
    """The load generator runs a phase without its cyclic GC. Its 10,000 devices' objects made
    8 full collections (0.65 s) and 875 young ones (0.24 s) in one storm, about an eighth of its
    CPU, taken from the 2 cores the gateway and the broker share with it during the connect
    burst. Reference counting still frees everything that is not a cycle; the cycles of one
    phase (asyncio's cancelled tasks) are collected after it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _free_port():
    import socket
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


GAUGES = (("replay_rate", "rate"), ("replay_credits_outstanding", "outstanding"), ("replayers_active", "active"),
          ("replayers_waiting", "waiting"), ("replay_tokens", "tokens"), ("queue_depth", "queue"),
          ("committed_records_per_second", "T"), ("ingest_pauses_total", "pauses"))


ADMISSION_COUNTERS = (("credits_granted_total", "credits granted"), ("backlog_announced_total", "backlog announced"),
                      ("replay_first_byte_timeouts_total", "first-byte timeouts"), ("hellos_total", "hellos"),
                      ("replay_rate_decreases_total", "rate cuts"), ("ingest_pauses_total", "ingest pauses"))


def _scrape(port, timeout):
    """{metric name without the edgeflow_gateway_ prefix: value text} from the gateway's metrics
    endpoint; raises OSError."""
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=timeout).read().decode()
    got = {}
    for ln in text.splitlines():
        if ln.startswith("edgeflow_gateway_"):
            k, _, v = ln[len("edgeflow_gateway_"):].partition(" ")
            got[k] = v
    return got


def scrape_between_phases(port):
    """One scrape of the gateway's metrics, taken between phases only (a scrape is CPU the
    gateway spends): the dict _scrape returns, or the OSError."""
    try:
        return _scrape(port, 5)
    except OSError as e:
        return e


def gateway_counters(got):
    """The admission's counters in a scrape taken after the storm: credits granted beyond the
    7.2 M backlog are grants the devices could not use."""
    if isinstance(got, OSError):
        return "(metrics: %s)" % got
    return ", ".join("%s %.0f" % (name, float(got[k])) for k, name in ADMISSION_COUNTERS if k in got)


def commits(got):
    """(checkpoints, seconds spent in their commits, acks sent) in a scrape, or None."""
    try:
        return tuple(float(got[k]) for k in ("checkpoint_seconds_count", "checkpoint_seconds_sum", "acks_total"))
    except (TypeError, KeyError, ValueError):
        return None


def commits_line(a, b, readings):
    """How the phase between scrapes a and b committed. The commit time is the gateway's
    checkpoint_seconds: from the call, so a commit queued behind the one in flight counts its wait."""
    if a is None or b is None or b[0] <= a[0]:
        return "checkpoints: -"
    n = b[0] - a[0]
    return "checkpoints %d (%.0f readings each, commit %.1f ms mean), acks %d (%.1f readings each)" % (
        n, readings / n, 1000.0 * (b[1] - a[1]) / n, b[2] - a[2], readings / max(1.0, b[2] - a[2]))


def gateway_gauges(port):
    """The admission state from the gateway's metrics endpoint (what limits the drain), one line."""
    try:
        got = _scrape(port, 1)
    except OSError:
        return ""
    return " ".join("%s %.0f" % (short, float(got[k])) for k, short in GAUGES if k in got)


def _loop_cpu_s(pid):
    """CPU seconds of a process's main thread (the gateway's event loop; the rest of its CPU is
    the database thread's)."""
    try:
        with open("/proc/%d/task/%d/stat" % (pid, pid)) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def _cpus(site):
    """CPU seconds so far of the gateway, the broker and this process (the replayers)."""
    return (proc_cpu_s(site.gateway.pid) if site.gateway else None,
            proc_cpu_s(site.broker.pid) if site.broker else None, time.process_time())


def _run_delay_s(pid):
    """Seconds a process's main thread was runnable but waited for a CPU (/proc/PID/schedstat)."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _waits(site):
    """Run delay so far of the gateway's event loop, the broker and the replayers' loop: the share
    of the wall time each waited for a CPU says how oversubscribed the 2 cores were."""
    return (_run_delay_s(site.gateway.pid) if site.gateway else None,
            _run_delay_s(site.broker.pid) if site.broker else None, _run_delay_s(os.getpid()))


def _cpu_shares(a, b):
    """Per process: % of one core used between two _cpus() samples (where the wall time goes)."""
    dt = b[0] - a[0]
    return "/".join("-" if x is None or y is None or dt <= 0 else "%.0f" % (100.0 * (y - x) / dt)
                    for x, y in zip(a[1], b[1]))


def _listen_overflows():
    """The kernel's count of connections dropped because a listen queue was full (each one
    costs that device a SYN retransmit, 1 s and more): the broker's accept backlog."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split(), values.split()))["ListenOverflows"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def _loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


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
    ap.add_argument("--gauges", action="store_true", help="progress lines show the gateway's admission gauges "
                    "(its metrics endpoint; with 10,000 devices a scrape costs the gateway about 30 ms of CPU, "
                    "0.3-0.4 s before metrics.device_series_max bounded the per-device series)")
    ap.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    ap.add_argument("--loop", choices=("asyncio", "uvloop", "auto"), default="asyncio",
                    help="the replayers' event loop (uvloop: pip install uvloop; auto: uvloop if installed)")
    ap.add_argument("--replayer-nice", type=int, default=0, help="run this process (the 10,000 devices' "
                    "stand-ins) this much nicer than the broker and the gateway, in every phase (with the "
                    "kernel's autogroups on: its session's autogroup nice; the bench then runs in a session "
                    "of its own)")
    ap.add_argument("--steady-devices", type=int, default=100, help="steady phase: devices sending live data")
    ap.add_argument("--steady-readings", type=int, default=2000000, help="steady phase: readings in all "
                                                                         "(0: no steady phase, no ratio)")
    ap.add_argument("--steady-window", type=int, default=1000, help="steady phase: unacked live readings per device")
    ap.add_argument("--rounds", type=int, default=1, help="run the bench this many times, each round in a fresh "
                    "process (its own broker, gateway and database), and print the median of the ratios")
    a = ap.parse_args(argv)
    if argv is None:  # a command, not a test's call: SIGTERM stops the gateway and mosquitto in order
        exit_on_sigterm()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if a.rounds > 1:
        return _rounds(sys.argv[1:] if argv is None else list(argv), a.rounds, a.dir)
    if a.replayer_nice and _autogroups():
        rc = _own_session(sys.argv[1:] if argv is None else argv)
        if rc is not None:
            return rc
    for dev, idx, s0, k in (("s00000", 0, 0, 50), ("s09999", 9999, 700, 20), ("l00042", 10042, 19999, 1)):
        t_base = NOW - 720000
        if encode_batch(dev, idx, t_base, s0, k) != wire.encode_readings(dev, 1, _rows(idx, t_base, s0, k)):
            raise SystemExit("bench_storm: encode_batch differs from wire.encode_readings")
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
    metrics_port = _free_port()
    extra = {"store": {"synchronous": a.synchronous}, "log": {"level": "warning"},
             "dedup": {"max_boots": 4}, "metrics": {"port": metrics_port}}
    if adm:
        extra["admission"] = adm
    site = Site(d, window_ms=60000, lateness_ms=60000, ooo_ms=5000, idle_ms=60000, groups=False, gw_extra=extra,
                insecure=a.insecure)
    print("bench_storm: %d devices x %d backlog readings = %d readings, %d per message" % (
        a.devices, a.backlog, a.devices * a.backlog, a.per_msg))
    print("machine: %s" % machine())
    print("replayers' event loop: %s" % use_loop(a.loop))
    print("load average before: %s (2 cores shared)" % _loadavg())
    rc = 1
    try:
        site.start_broker()
        n_steady = a.steady_devices if a.steady_readings > 0 else 0
        bench = Bench(site.port, a.devices, a.backlog, a.per_msg, a.jitter_s, a.resend_s, broker=site.mq,
                      steady_devices=n_steady)
        bench.window = a.steady_window
        bench.metrics_port = metrics_port if a.gauges else 0
        site.start_gateway()
        if a.replayer_nice:  # after the broker and the gateway started: they keep priority 0
            print("replayers nicer by %d: %s" % (a.replayer_nice, _lower_priority(a.replayer_nice)), flush=True)
        time.sleep(1.5)
        bench.stall_s = a.stall_s
        steady = []
        per_dev = -(-a.steady_readings // n_steady) if n_steady else 0

        def steady_phase(prefix, when, k0=None):
            if k0 is None:
                k0 = commits(scrape_between_phases(metrics_port))
            with no_gc():
                r = asyncio.run(bench.steady(site, n_steady, per_dev, a.timeout, prefix))
            k1 = commits(scrape_between_phases(metrics_port))
            print("steady %s: %d connected devices x %d live readings: %d committed in %.1f s = %.0f readings/s, "
                  "gateway CPU %.2f us per reading (event loop %.2f), CPU %% gateway/broker/replayers %s, waiting for a "
                  "CPU %% (main threads) %s, load average %s" % (
                      when, n_steady, per_dev, r[1], r[0], r[1] / r[0], 1e6 * r[2] / max(1, r[1]),
                      1e6 * r[4] / max(1, r[1]), r[3], r[5], _loadavg()),
                  flush=True)
            print("  steady %s: %s" % (when, commits_line(k0, k1, r[1])), flush=True)
            if r[1] != n_steady * per_dev:
                print("steady phase incomplete: the ratio below is not valid")
            steady.append(r)

        if n_steady:
            steady_phase("l", "before")
        k0 = commits(scrape_between_phases(metrics_port))  # before the CPU marks: the scrape is not the storm's work
        gw_cpu0, gw_loop0 = proc_cpu_s(site.gateway.pid), _loop_cpu_s(site.gateway.pid)
        lo0 = _listen_overflows()
        cpu0 = time.process_time()
        with no_gc():
            t0, committed = asyncio.run(bench.run(site, a.timeout, a.progress_s))
        st = bench.st
        t_first = st.first_connect or t0
        drain = (st.last_done or time.monotonic()) - t_first
        gw_cpu, br_cpu = proc_cpu_s(site.gateway.pid) - gw_cpu0, proc_cpu_s(site.broker.pid)
        gw_loop = _loop_cpu_s(site.gateway.pid) - gw_loop0
        me_cpu = time.process_time() - cpu0
        after = scrape_between_phases(metrics_port)  # one scrape: the commits and the admission counters
        k1 = commits(after)
        lo1 = _listen_overflows()
        print("storm done, load average %s; connects dropped by a full listen queue (whole machine): %s" % (
            _loadavg(), "-" if lo0 is None or lo1 is None else lo1 - lo0), flush=True)
        print("gateway admission counters (whole run): %s" % gateway_counters(after), flush=True)
        print("storm: %s" % commits_line(k0, k1, committed), flush=True)
        if n_steady:
            steady_phase("m", "after", k1)  # the storm's closing scrape opens it
        gw_kb, br_kb = vm_hwm_kb(site.gateway.pid), vm_hwm_kb(site.broker.pid)
        me_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = a.devices * a.backlog
        rcg = site.stop_gateway(120)
        # ---- the database
        db = sqlite3.connect(site.db)
        storm = "FROM readings WHERE device LIKE 's%'"
        rows, distinct = db.execute("SELECT count(*), count(DISTINCT device || ':' || boot || ':' || seq) "
                                    + storm).fetchone()
        bad = db.execute("SELECT count(*) FROM (SELECT device, count(*) n, min(seq) lo, max(seq) hi "
                         + storm + " GROUP BY device) WHERE n != ? OR lo != 0 OR hi != ?",
                         (a.backlog, a.backlog - 1)).fetchone()[0]
        ndev = db.execute("SELECT count(DISTINCT device) " + storm).fetchone()[0]
        for prefix in "lm"[:len(steady)]:  # the steady phases' rows: each device's seqs exactly once
            s_rows, s_distinct = db.execute("SELECT count(*), count(DISTINCT device || ':' || seq) FROM readings "
                                            "WHERE device LIKE ?", (prefix + "%",)).fetchone()
            if s_rows != s_distinct or s_rows != n_steady * per_dev:
                print("steady phase: %d rows, %d distinct, %d expected" % (s_rows, s_distinct, n_steady * per_dev))
                bad += 1
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
        print("CPU: gateway %.1f s, broker %.1f s, replayers %.1f s (%s %% of one core over the drain)" % (
            gw_cpu or 0, br_cpu or 0, me_cpu, "/".join("%.0f" % (100.0 * (c or 0) / drain) if drain else "-"
                                                       for c in (gw_cpu, br_cpu, me_cpu))))
        print("database: %d readings rows, %d distinct identities, %d devices incomplete, "
              "missing %d (still held by devices that did not finish), duplicated rows %d, duplicates absorbed "
              "by dedup %d, window results %d, quarantined %d"
              % (rows, distinct, bad, missing, dup_rows, dups, wins, quar))
        ok = missing == 0 and dup_rows == 0 and bad == 0 and ndev == a.devices and rcg == 0
        if steady and drain:
            rates = [r[1] / r[0] for r in steady]
            cpus = [r[2] / max(1, r[1]) for r in steady]
            s_rate, s_cpu = sum(rates) / len(rates), sum(cpus) / len(cpus)
            st_rate, st_cpu = committed / drain, (gw_cpu or 0) / max(1, committed)
            print("storm / steady (goal >= 0.8): %.2f by wall clock (%.0f / %.0f readings/s, steady before and after: "
                  "%s), %s by gateway CPU per reading (%.2f / %.2f us; event loop %.2f / %.2f)" % (
                      st_rate / s_rate, st_rate, s_rate, " ".join("%.0f" % x for x in rates),
                      cpu_ratio([r[2] for r in steady] + [gw_cpu or 0], s_cpu, st_cpu), 1e6 * st_cpu, 1e6 * s_cpu,
                      1e6 * gw_loop / max(1, committed), 1e6 * sum(r[4] / max(1, r[1]) for r in steady) / len(steady)))
        print("RESULT: %s" % ("OK (0 lost, 0 duplicated)" if ok else
                              "FAILED (%d devices stalled with %d records undelivered, %d duplicated rows)"
                              % (a.devices - st.done, missing, dup_rows)))
        rc = 0 if ok else 1
    finally:
        site.close()
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    return rc



_RATIO = re.compile(r"storm / steady \(goal >= 0\.8\): ([0-9.]+) by wall clock .*?, ([0-9.]+|n/a) by gateway CPU")
MIN_CPU_TICKS = 10  # a phase's gateway CPU below this many /proc clock ticks makes the CPU ratio mostly rounding


def cpu_ratio(phase_cpu_s, steady_per_reading, storm_per_reading):
    """The storm / steady ratio by gateway CPU per reading, as printed: n/a when any phase's gateway
    CPU is under MIN_CPU_TICKS clock ticks (/proc counts CPU in ticks of 10 ms: a 50-device run's
    steady phase measured 0 and printed 0.00)."""
    if min(phase_cpu_s) * os.sysconf("SC_CLK_TCK") < MIN_CPU_TICKS or not storm_per_reading:
        return "n/a"
    return "%.2f" % (steady_per_reading / storm_per_reading)


def rounds_summary(walls, cpus, ok, n):
    """The --rounds figure: each round's ratios and their medians (a round that printed no ratio
    counts as missing, not as 0)."""
    def part(xs):
        return "%s -> median %.2f" % (" ".join("%.2f" % x for x in xs), statistics.median(xs)) if xs else "none"
    return ("rounds: %d; storm / steady (goal >= 0.8) by wall clock: %s; by gateway CPU per reading: %s; "
            "rounds with 0 lost and 0 duplicated: %d of %d" % (n, part(walls), part(cpus), ok, n))


def _rounds(argv, n, work_dir):
    """--rounds n: the bench n times, each in a fresh process (dying with this one), its output
    passed through, then rounds_summary(). Exit code 0 iff every round was exact."""
    walls, cpus, ok = [], [], 0
    for k in range(n):
        print("==== round %d of %d" % (k + 1, n), flush=True)
        extra = ["--dir", os.path.join(work_dir, "round-%d" % (k + 1))] if work_dir else []
        # the options as given, then what this round differs in (argparse: the last one counts, also over
        # an abbreviation such as --round 5)
        p = popen([sys.executable, os.path.abspath(__file__)] + list(argv) + extra + ["--rounds", "1"],
                  stdout=subprocess.PIPE, text=True)
        try:
            for line in p.stdout:
                print(line, end="", flush=True)
                m = _RATIO.search(line)
                if m:
                    walls.append(float(m.group(1)))
                    if m.group(2) != "n/a":
                        cpus.append(float(m.group(2)))
            ok += p.wait() == 0
        finally:
            if p.poll() is None:
                p.terminate()
                p.wait()
    print(rounds_summary(walls, cpus, ok, n), flush=True)
    return 0 if ok == n else 1


def _autogroups():
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _own_session(argv):
    """Run this bench in a session of its own, so that its autogroup's nice touches nothing else
    (the shell that started it): the same bench again in a new session, dying with this one, which
    stays in the caller's session for its Ctrl-C (a setsid() here would leave the terminal's
    process group and never see it). Returns that run's exit code, or None in the new session."""
    if os.getsid(0) == os.getpid():
        return None
    p = popen([sys.executable, os.path.abspath(__file__)] + list(argv), start_new_session=True)
    try:
        return p.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches this process only: the bench stops in order
        p.send_signal(signal.SIGINT)
        return p.wait()


def _lower_priority(n):
    """This process n nicer. With autogroups on (/proc/sys/kernel/sched_autogroup_enabled) the
    scheduler shares the CPU between sessions first and a process's own nice only orders it within
    its session; the broker and the gateway run in sessions of their own (tools/fleet.Site), so
    what counts is this session's autogroup nice (sched(7))."""
    if not _autogroups():
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + n)
        return "process nice %d" % os.getpriority(os.PRIO_PROCESS, 0)
    with open("/proc/self/autogroup", "w") as f:
        f.write("%d" % n)
    with open("/proc/self/autogroup") as f:
        return "autogroup %s" % f.read().strip()


def use_loop(which):
    """The replayers' event loop (this process only; the gateway keeps asyncio's). Same protocol
    code either way; uvloop makes the replayers about 20 % cheaper and their connects faster, which
    did not raise the ratio (docs/benchmarks.md, run I), so asyncio's is the default. Returns what
    is used."""
    if which in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if which == "uvloop":
                raise SystemExit("bench_storm: --loop uvloop: uvloop is not installed (pip install uvloop)")
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop %s" % uvloop.__version__
    asyncio.set_event_loop_policy(None)
    return "asyncio"


def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
