"""Fuzz the gateway's data path with hostile messages among real devices.

    python tools/fuzz_gateway.py [--messages 100000] [--seed 1] [--real 8]

In-process: the real Gateway (decode, dedup, watermarks, windows, SQLite commits) with
a stub in place of MQTT. Hostile messages (random bytes, truncations and bit flips of
valid messages, every field at its limits, wrong versions, oversize, hostile hellos and
gap records, bad topics, invented device ids beyond the device cap) are interleaved
with the traffic of real devices (readings and records, some resent). Checks:
  - nothing raises out of the gateway and no commit fails;
  - every message an independent oracle (below: its own parser, not shared.wire) calls bad
    is quarantined with exactly the oracle's reason, and nothing else is quarantined whole;
    record-level rejections (bad event times) are ones the oracle predicted;
  - every real record is committed exactly once (table readings);
  - RSS stays bounded, the quarantine table stays within its limits.
Prints figures; exit status 0 when every check holds. tests/test_gateway_fuzz.py runs a
short variant.
"""
import argparse
import asyncio
import logging
import os
import random
import sqlite3
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gateway.service import Gateway  # noqa: E402
from shared import wire  # noqa: E402

PREFIX = "edgeflow"
U32 = 0xFFFFFFFF

# ====================================================================== the oracle
# Written from docs/wire.md, independently of shared/wire.py: byte offsets and int.from_bytes.

_ID_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MIN_MS = 1577836800000  # 2020-01-01
UNSYNCED_MAX = 1 << 40


def _u(p, off, n):
    return int.from_bytes(p[off:off + n], "big")


def _s(p, off, n):
    return int.from_bytes(p[off:off + n], "big", signed=True)


def _name_ok(b, limit):
    try:
        s = bytes(b).decode()
    except UnicodeDecodeError:
        return None
    return s if 0 < len(s) <= limit and all(c in _ID_OK for c in s) else None


def _time_reason(t, now, max_future):
    if t < MIN_MS:
        return "seconds_not_ms" if 1577836800 <= t < 4102444800 else "before_2020"
    if t > now + max_future:
        return "micros_not_ms" if t >= MIN_MS * 1000 else "far_future"
    return None


def _preamble(p, limit, version):
    if len(p) > limit:
        return "oversize"
    if len(p) < 4:
        return "truncated"
    if p[0] != 0xE5:
        return "bad_magic"
    if p[1] != version:
        return "newer_version" if p[1] > version else "unknown_version"
    return None


class Oracle:
    """Predicts the gateway's verdict: (whole-message reason or None, {(boot, seq): reason})."""

    def __init__(self, max_devices, max_future, version):
        self.cap = max_devices
        self.max_future = max_future
        self.version = version
        self.known = set()

    def verdict(self, topic, p, now):
        head = PREFIX + "/d/"
        if not topic.startswith(head):
            return "bad_topic", {}
        rest = topic[len(head):]
        i = rest.find("/")
        if i <= 0:
            return "bad_topic", {}
        dev = _name_ok(rest[:i].encode(), 32)
        if dev is None:
            return "bad_device_id", {}
        leaf = rest[i + 1:]
        if leaf not in ("data", "hello", "state", "ack"):
            return "bad_topic", {}
        if dev not in self.known:
            if len(self.known) >= self.cap:
                return "too_many_devices", {}
            self.known.add(dev)
        if leaf == "ack":
            return "unexpected_topic", {}
        if leaf == "state":
            return self._state(p), {}
        if leaf == "hello":
            return self._hello(p, dev), {}
        return self._data(p, dev, now)

    def _state(self, p):
        r = _preamble(p, 64, self.version)
        if r:
            return r
        if len(p) != 6:
            return "bad_length"
        if p[2] != 5:
            return "unexpected_type"
        return "bad_state" if p[4] > 1 else None

    def _hello(self, p, dev):
        """v2 hello: header, backlog, floor boot, floor seq, instance, nonce, fw length, fw, 16-byte MAC."""
        r = _preamble(p, 512, self.version)
        if r:
            return r
        if len(p) < 22:
            return "truncated"
        if p[2] != 4:
            return "unexpected_type"
        idl = p[3]
        if len(p) < 22 + idl + 21:
            return "truncated"
        pid = _name_ok(p[22:22 + idl], 32)
        if pid is None:
            return "bad_device_id"
        o = 22 + idl
        fl = p[o + 20]
        if len(p) != o + 21 + fl + 16:
            return "bad_length"
        try:
            bytes(p[o + 21:o + 21 + fl]).decode()
        except UnicodeDecodeError:
            return "bad_fw"
        boot, nxt, fb, fs = _u(p, 4, 4), _u(p, 8, 4), _u(p, o + 4, 4), _u(p, o + 8, 4)
        if fb > boot or (fb == boot and fs > nxt):
            return "bad_floor"
        if pid != dev:
            return "spoofed_device_id"
        return "bad_nonce" if _u(p, o + 16, 4) == 0 else None

    def _data(self, p, dev, now):
        r = _preamble(p, 65536, self.version)
        if r:
            return r, {}
        if len(p) < 22:
            return "truncated", {}
        typ, idl = p[2], p[3]
        if typ not in (1, 2):
            return "unexpected_type", {}
        boot, base, bt, n = _u(p, 4, 4), _u(p, 8, 4), _s(p, 12, 8), _u(p, 20, 2)
        if n == 0:
            return "empty", {}
        if len(p) < 22 + idl:
            return "truncated", {}
        pid = _name_ok(p[22:22 + idl], 32)
        if pid is None:
            return "bad_device_id", {}
        off = 22 + idl
        recs = []  # (seq, t, flags, is_gap)
        last = -1
        if typ == 1:
            if len(p) != off + 12 * n:
                return "bad_length", {}
            for k in range(n):
                o = off + 12 * k
                ds = _u(p, o, 2)
                if ds <= last:
                    return "seq_order", {}
                last = ds
                recs.append((base + ds, bt + _s(p, o + 2, 4), p[o + 7], False))
        else:
            for k in range(n):
                if off + 8 > len(p):
                    return "truncated", {}
                kind, ds, dt, fl = p[off], _u(p, off + 1, 2), _s(p, off + 3, 4), p[off + 7]
                off += 8
                if kind not in (2, 3, 4, 5, 6):
                    return "unknown_kind", {}
                if ds <= last:
                    return "seq_order", {}
                last = ds
                off, why = self._body(p, kind, off)
                if why:
                    return why, {}
                recs.append((base + ds, bt + dt, fl, kind == 6))
            if off != len(p):
                return "trailing_bytes", {}
        if base + last > U32:
            return "bad_seq", {}
        if pid != dev:
            return "spoofed_device_id", {}
        per = {}
        for seq, t, fl, gap in recs:
            if gap:
                continue
            if fl & 1:
                why = None if 0 <= t <= UNSYNCED_MAX else "bad_unsynced_time"
            else:
                why = _time_reason(t, now, self.max_future)
            if why:
                per[(boot, seq)] = why
        return None, per

    @staticmethod
    def _body(p, kind, off):
        """(new offset, reason or None) for a record body."""
        size = {2: 33, 4: 14, 5: 32}.get(kind)
        if size is not None:
            if off + size > len(p):
                return off, "truncated"
            if kind == 4 and p[off + 1] not in (1, 2):
                return off, "bad_detector"
            return off + size, None
        if kind == 3:  # cep: rule length, rule, severity, span, evidence count, evidence
            if off + 1 > len(p):
                return off, "truncated"
            ln = p[off]
            off += 1
            if off + ln + 6 > len(p):
                return off, "truncated"
            if _name_ok(p[off:off + ln], 32) is None:
                return off, "bad_rule_id"
            off += ln
            ne = p[off + 5]
            off += 6
            if ne > 8:
                return off, "bad_evidence"
            if off + 4 * ne > len(p):
                return off, "truncated"
            return off + 4 * ne, None
        # gap: boot, range count, (first u32, length u16) each
        if off + 5 > len(p):
            return off, "truncated"
        nr = p[off + 4]
        off += 5
        if nr < 1 or nr > 16:
            return off, "bad_gap"
        if off + 6 * nr > len(p):
            return off, "truncated"
        for _ in range(nr):
            first, length = _u(p, off, 4), _u(p, off + 4, 2)
            if length < 1 or first + length - 1 > U32:
                return off, "bad_gap"
            off += 6
        return off, None


# The hello contract's verdicts that depend on earlier hellos of the device (an older session,
# a re-flashed instance): the oracle checks every stateless rule and accepts these for a
# well-formed hostile hello.
HELLO_STATE_VERDICTS = ("stale_hello", "retired_instance")

# ====================================================================== traffic


class Real:
    """A well-behaved device: readings and records in seq order, sometimes resent."""

    def __init__(self, name, rng, t0):
        self.name, self.rng, self.t = name, rng, t0
        self.seq = 0
        self.sent = []  # the last payloads, for resends
        # what must be in table readings, exactly once: count and sums (constant memory)
        self.n = self.sum_t = self.sum_v = self.sum_cs = 0

    def next(self):
        rng = self.rng
        if self.sent and rng.random() < 0.05:
            return rng.choice(self.sent[-20:])  # a resend: duplicates only
        if rng.random() < 0.1:
            p = wire.encode_records(self.name, 1, [(wire.KIND_STATUS, self.seq, self.t, 0,
                                                    (100, 5, 600, 0, 0, 0, 50000, 1))])
            self.seq += 1
        else:
            n = rng.randint(1, 40)
            rs = []
            for _ in range(n):
                self.t += rng.randint(0, 40)
                rs.append((self.seq, self.t, self.seq % 3, 0, rng.randint(-100000, 100000)))
                self.n += 1
                self.sum_t += self.t
                self.sum_v += rs[-1][4]
                self.sum_cs += rs[-1][2] * self.seq
                self.seq += 1
            p = wire.encode_readings(self.name, 1, rs)
        self.sent = self.sent[-19:] + [p]
        return p


def _valid_for(rng, dev, now):
    """A valid message of a hostile device, with times good or bad (record-level problems)."""
    boot = rng.choice((1, 2, rng.randint(0, U32)))
    seq = rng.randint(0, 5000) if rng.random() < 0.8 else rng.randint(0, U32 - 100)
    t = rng.choice((now - rng.randint(0, 10 ** 7), now // 1000, now * 1000, 1000, now + 3 * 86400000,
                    now - rng.randint(0, 10 ** 9)))
    fl = rng.choice((0, 0, 0, wire.FLAG_UNSYNCED, 255))
    k = rng.random()
    if k < 0.5:
        n = rng.randint(1, 20)
        return "data", wire.encode_readings(dev, boot, [(seq + i, t + i, i % 4, fl, i) for i in range(n)])
    if k < 0.75:
        kind = rng.choice((wire.KIND_WINDOW, wire.KIND_CEP, wire.KIND_ANOMALY, wire.KIND_STATUS, wire.KIND_GAP))
        body = {
            wire.KIND_WINDOW: (1, 10000, 100, -5, 5, 0, 3, 10, 9990),
            wire.KIND_CEP: ("rule-" + str(rng.randint(0, 9)), 2, 5000, tuple(range(rng.randint(0, 8)))),
            wire.KIND_ANOMALY: (1, wire.DETECTOR_ZSCORE, 4500, 99000, 20000),
            wire.KIND_STATUS: (1, 2, 3, 4, 5, -6, 7, 8),
            wire.KIND_GAP: (boot, tuple((rng.randint(0, U32 - 0xFFFF), rng.randint(1, 0xFFFF))
                                        for _ in range(rng.randint(1, 16)))),
        }[kind]
        return "data", wire.encode_records(dev, boot, [(kind, seq, t, fl if kind != wire.KIND_GAP else 0, body)])
    if k < 0.92:
        nxt = rng.choice((0, seq, U32))
        fb = rng.choice((0, boot))
        return "hello", wire.encode_hello(dev, boot, nxt, now, rng.choice((0, 5, U32)), fb,
                                          rng.choice((0, nxt)) if fb == boot else rng.choice((0, seq, U32)),
                                          rng.choice((1, rng.randint(0, U32))), rng.choice((0, 1, U32)), "fw-x")
    return "state", wire.encode_state(rng.random() < 0.5)


# a template's integer fields: (offset, byte size) from the header on
_HDR_FIELDS = ((1, 1), (2, 1), (3, 1), (4, 4), (8, 4), (12, 8), (20, 2))


def hostile(rng, now, hostile_ids, real_ids, invented):
    """One hostile (topic, payload) and what kind of mutation it is."""
    k = rng.random()
    dev = rng.choice(hostile_ids)
    if k < 0.12:
        invented[0] += 1
        dev = "inv%06d" % invented[0]  # beyond the device cap soon
    leaf, p = _valid_for(rng, dev, now)
    topic = "%s/d/%s/%s" % (PREFIX, dev, leaf)
    k = rng.random()
    if k < 0.15:
        kind = "random"
        p = os.urandom(rng.randint(0, 300)) if rng.random() < 0.5 else \
            bytes((0xE5, wire.VERSION, rng.randint(0, 7))) + os.urandom(rng.randint(0, 200))
    elif k < 0.3:
        kind = "truncated"
        p = p[:rng.randint(0, len(p) - 1)]
    elif k < 0.5:
        kind = "bitflip"
        b = bytearray(p)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        p = bytes(b)
    elif k < 0.65:
        kind = "limits"
        b = bytearray(p)
        off, size = rng.choice(_HDR_FIELDS + ((22 + len(dev), 2), (24 + len(dev), 4), (len(b) - 4, 4),
                                              (len(b) - 2, 2), (len(b) - 1, 1)))
        if off + size <= len(b):
            v = rng.choice((0, (1 << (8 * size)) - 1, 1 << (8 * size - 1), (1 << (8 * size - 1)) - 1, 1))
            b[off:off + size] = v.to_bytes(size, "big")
        p = bytes(b)
    elif k < 0.7:
        kind = "version"
        p = p[:1] + bytes((rng.choice((0, 2, 3, 255)),)) + p[2:]
    elif k < 0.75:
        kind = "oversize"
        p = p + os.urandom(rng.choice((65536, 600, 100)))
    elif k < 0.8:
        kind = "spoofed"
        topic = "%s/d/%s/%s" % (PREFIX, rng.choice(real_ids), leaf)
    elif k < 0.85:
        kind = "bad_topic"
        topic = rng.choice(("%s/d/%s" % (PREFIX, dev), "other/d/%s/data" % dev, "%s/d/a.b/data" % PREFIX,
                            "%s/d/%s/ack" % (PREFIX, dev), "%s/d/%s/nope" % (PREFIX, dev), "%s/d//data" % PREFIX,
                            "%s/d/%s/data" % (PREFIX, "x" * 33)))
    else:
        kind = "valid_" + leaf  # well-formed hostile input: bad times, hostile hellos and gaps
    return kind, topic, p


# ====================================================================== the run


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Stub:
    def __init__(self):
        self.queue = ()
        self.maxsize = 1000
        self.acks = 0

    def puback(self, mids):
        pass

    def publish(self, topic, payload, qos=1, retain=False):
        wire.decode_ack(payload)  # every ack the gateway sends must decode
        self.acks += 1


async def run(messages, seed=1, n_real=8, workdir=None, max_devices=300, oracle_cls=None):
    """The fuzz run's figures (below). Its database goes into workdir, or a temporary
    directory removed afterwards."""
    if workdir is not None:
        return await _run(messages, seed, n_real, workdir, max_devices, oracle_cls)
    with tempfile.TemporaryDirectory(prefix="edgeflow-fuzz-") as tmp:
        return await _run(messages, seed, n_real, tmp, max_devices, oracle_cls)


async def _run(messages, seed, n_real, workdir, max_devices, oracle_cls):
    logging.disable(logging.WARNING)  # hostile hellos make the gateway warn (re-flashes): not the figures
    rng = random.Random(seed)
    db = os.path.join(workdir, "fuzz.db")
    limits = {"max_devices": max_devices, "quarantine_payload_bytes": 256, "quarantine_max_rows": 20000}
    gw = Gateway({"store": {"path": db, "synchronous": "NORMAL"}, "metrics": {"port": 0}, "limits": limits,
                  "checkpoint": {"ack_interval_ms": 0}, "security": {"insecure": True}})
    gw.ingest = _Stub()
    await gw.open()
    oracle = (oracle_cls or Oracle)(max_devices, gw.max_future, wire.VERSION)
    log_q = []
    cur = [0]
    orig = gw._quarantine

    def spy(topic, dev, reason, detail, payload, now, boot=None, seq=None):
        log_q.append((cur[0], reason, payload is not None, boot, seq))
        return orig(topic, dev, reason, detail, payload, now, boot, seq)
    gw._quarantine = spy

    now = int(time.time() * 1000)
    reals = [Real("r%d" % i, random.Random(seed * 100 + i), now - 3600000) for i in range(n_real)]
    hostile_ids = ["h%d" % i for i in range(150)]
    invented = [0]
    mismatches = []
    hello_state = {}
    kinds = {}
    bad_whole = 0
    samples = []
    crashes = []
    t0 = time.perf_counter()
    i = 0
    for i in range(messages):
        cur[0] = i
        if rng.random() < 0.25:
            r = rng.choice(reals)
            topic, p, kind = "%s/d/%s/data" % (PREFIX, r.name), r.next(), "real"
        else:
            kind, topic, p = hostile(rng, now, hostile_ids, [r.name for r in reals], invented)
        reason, per = oracle.verdict(topic, p, now)
        kinds[kind] = kinds.get(kind, 0) + 1
        if reason:
            bad_whole += 1
        try:
            gw._handle(topic.encode(), p, now)
        except Exception as e:  # noqa: BLE001 - counted and reported: the gateway must never raise
            crashes.append((i, kind, repr(e)))
        got = [q[1] for q in log_q if q[2]]
        if not reason and topic.endswith("/hello") and got and got[0] in HELLO_STATE_VERDICTS:
            hello_state[got[0]] = hello_state.get(got[0], 0) + 1  # depends on earlier hellos: not modelled
        elif got != ([reason] if reason else []):
            mismatches.append((i, kind, "oracle %s, gateway %s" % (reason, got)))
        for _i, r, whole, boot, seq in log_q:
            if not whole and per.get((boot, seq)) != r:
                mismatches.append((i, kind, "record (%s, %s): gateway %s, oracle %s" % (boot, seq, r, per)))
        del log_q[:]
        gw.out.mids.append((i, 1))
        if i % 500 == 499:
            await gw.checkpoint()
            if gw._commit_task is not None:
                await gw._commit_task  # a failed commit raises here and ends the run
        if i % 2000 == 0:
            samples.append(rss_kb())
    await gw.checkpoint()
    if gw._commit_task is not None:
        await gw._commit_task
    elapsed = time.perf_counter() - t0
    samples.append(rss_kb())
    stats = gw.stats
    await gw.store.close()
    logging.disable(logging.NOTSET)

    # ---- every real record exactly once: as many rows as readings, all seqs distinct, same sums
    c = sqlite3.connect(db)
    lost = dup = wrong = 0
    for r in reals:
        n, distinct, st, sv, scs = c.execute(
            "SELECT count(*), count(DISTINCT seq), coalesce(sum(t), 0), coalesce(sum(value), 0), "
            "coalesce(sum(channel * seq), 0) FROM readings WHERE device = ? AND boot = 1", (r.name,)).fetchone()
        dup += n - distinct
        lost += max(0, r.n - distinct)
        wrong += (st, sv, scs) != (r.sum_t, r.sum_v, r.sum_cs)
    q_rows, q_bytes = c.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM quarantine").fetchone()
    c.close()
    real_records = sum(r.n for r in reals)
    warm = samples[len(samples) // 5]  # after a fifth of the run: caches and SQLite's page cache warm
    growth = max(samples) - warm
    res = {
        "messages": messages, "seconds": round(elapsed, 1), "msgs_per_s": round(messages / elapsed),
        "hostile": messages - kinds.get("real", 0), "bad_whole_messages": bad_whole, "kinds": kinds,
        "quarantined_by_reason": dict(sorted(stats.quarantined.items())), "crashes": len(crashes),
        "oracle_mismatches": len(mismatches), "hello_verdicts_from_state": hello_state, "real_readings": real_records, "lost": lost, "duplicated": dup,
        "wrong_values": wrong, "rss_kb_first": samples[0], "rss_kb_max": max(samples),
        "rss_kb_after_warmup": warm, "rss_growth_kb_after_warmup": growth, "quarantine_rows": q_rows, "quarantine_payload_bytes": q_bytes,
        "quarantine_pruned": stats.quarantine_pruned, "devices": len(gw.devices.devs), "acks": gw.ingest.acks,
    }
    res["ok"] = (not crashes and not mismatches and lost == 0 and dup == 0 and wrong == 0
                 and stats.quarantined.get("internal_error", 0) == 0 and q_rows <= 20000)
    res["examples"] = (crashes[:5], mismatches[:10])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--real", type=int, default=8, help="real devices among the hostile traffic")
    ap.add_argument("--dir", default=None, help="work dir, kept (default: a temporary dir, removed)")
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.messages, args.seed, args.real, args.dir))
    for k, v in res.items():
        if k != "examples":
            print("%-28s %s" % (k, v))
    crashes, mism = res["examples"]
    for c in crashes:
        print("crash:", c)
    for m in mism:
        print("mismatch:", m)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
