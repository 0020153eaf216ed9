"""The gateway against a plain loop and SQLite's ceiling, on one pre-generated workload (issue 16).

    python tools/bench_compare.py                 # 200 devices x 3 channels x 600 s (~1-2 min here)
    python tools/bench_compare.py --full          # the issue's 1,000 devices x 3 channels x 1,000 s

Every device sends one reading per channel per second of event time, 50 readings per wire
message, devices interleaved; about 0.9 % of the messages are sent a second time a few rounds
later (duplicates). 60 s tumbling device windows, 5 s out-of-orderness. One run prints, as the
median of --rounds alternating rounds, with raw readings kept and without:

  gateway in-process   Gateway with an in-memory ingest (no MQTT): every message queued at once
  gateway + mosquitto  the same through mosquitto (QoS 1, preloaded persistent session, like
                       tools/bench_gateway.py; an explicitly insecure broker: plaintext, anonymous)
  plain loop           dict dedup + window dicts + sqlite3 executemany, one thread, same results;
                       raw rows indexed by (device, t) so they can be read by device and time
                       (the gateway: one reading_spans row per message), then without that index
  handling alone       the gateway's per-message work without event loop or commit (CPU only)
  SQLite ceiling       executemany of the same raw rows alone (one-row and 500-row INSERTs; then
                       without the (device, t) index, and as one blob row per wire message)

Rates are unique readings committed per second, timed from the first message to the last
commit. The window results of every engine are checked equal to the plain loop's (and the raw
row count to the unique readings). Prints figures; it is not a test. The gateway runs its compiled
modules if built (batch loops, windows, watermarks, the data path, the MQTT packet cutter:
gateway/accel.py; the header line says which): EDGEFLOW_PURE_PYTHON=1 for the pure Python ones.
"""
import argparse
import asyncio
import collections
import gc
import os
import random
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gateway import store as gstore  # noqa: E402
from gateway.ingest import Ingest  # noqa: E402
from shared import wire  # noqa: E402
from tools import bench_gateway as bg  # noqa: E402

T0 = bg.T0
SIZE_MS = 60000
OOO_MS = 5000
CKPT_MSGS = 400  # messages per transaction, the gateway's checkpoint.max_messages in this bench


def workload(devices, channels, seconds, per_msg=50, dup_frac=0.00913, seed=16):
    """(msgs [(topic, payload)], unique readings, raw rows in stream order): a hello per device,
    then the reading batches of every device interleaved, with duplicates re-sent later."""
    rng = random.Random(seed)
    topics = wire.Topics("edgeflow")
    devs = ["dev%05d" % d for d in range(devices)]
    msgs = [(topics.hello(dev), wire.encode_hello(dev, 1, 0, T0, 0, 1, 0, d + 1, d + 1, "bench-1"))
            for d, dev in enumerate(devs)]
    per_dev = channels * seconds
    phase = [rng.randrange(1000) for _ in devs]  # sampling instant within each second
    later = collections.defaultdict(list)
    rows = []
    for m, base in enumerate(range(0, per_dev, per_msg)):
        for d, dev in enumerate(devs):
            rs = [(s, T0 + phase[d] + (s // channels) * 1000, s % channels, 0, 20000 + rng.randrange(-3000, 3000))
                  for s in range(base, min(per_dev, base + per_msg))]
            p = wire.encode_readings(dev, 1, rs)
            msgs.append((topics.data(dev), p))
            rows.extend((dev, 1) + r for r in rs)
            if rng.random() < dup_frac:
                later[m + rng.randrange(1, 5)].append((topics.data(dev), p))
        msgs.extend(later.pop(m, ()))
    for k in sorted(later):
        msgs.extend(later[k])
    return msgs, len(rows), rows


def tweak_cfg(retain):
    def tweak(cfg):
        cfg["store"]["retain_readings"] = retain
        cfg["windows"] = {"size_ms": SIZE_MS}
        cfg["watermark"] = {"out_of_orderness_ms": OOO_MS}
        cfg["web"] = {"port": 0}
        cfg["checkpoint"]["max_messages"] = CKPT_MSGS
    return tweak


class MemIngest:
    """The service's ingest interface over pre-generated messages, all queued at once."""

    def __init__(self, msgs, cfg, stats):
        self.queue = collections.deque()
        self.maxsize = 10
        self.mids = 0  # message ids handed out
        self.wake = asyncio.Event()
        self.add(msgs)
        self.connected = asyncio.Event()
        self.paused = self.closing = False
        self.acked = self.published = 0
        self.t_start = None

    def add(self, msgs):
        """Queue [(topic, payload)] behind what is queued (QoS 1, received now)."""
        now, m = time.monotonic(), self.mids
        self.queue.extend((t.encode(), p, m + i, 1, now) for i, (t, p) in enumerate(msgs))
        self.mids += len(msgs)
        self.maxsize = max(self.maxsize, len(self.queue))
        self.wake.set()

    async def start(self):
        self.t_start = time.perf_counter()  # processing starts right after this
        self.connected.set()

    async def stop(self, offline=True):
        pass

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def maybe_resume(self):
        pass

    def puback(self, mids):
        self.acked += len(mids)

    def publish(self, topic, payload, qos=1, retain=False):
        self.published += 1


def _results(db):
    c = sqlite3.connect(db)
    try:
        res = c.execute("SELECT key, channel, start, end, revision, count, sum, min, max FROM window_results "
                        "WHERE scope = 'device'").fetchall()
        raw = c.execute("SELECT count(*) FROM readings").fetchone()[0]
    finally:
        c.close()
    return sorted(res), raw


def _timed(factory, box):
    """The ingest factory, noting the process CPU once the gateway has created its ingest (its
    database is open and its state restored by then, and MemIngest's queue of the whole workload
    built: set-up is not counted)."""
    def make(c, s):
        ingest = factory(c, s)
        box.append(time.process_time())
        return ingest
    return make


def run_inproc(tmp, name, msgs, n, retain):
    db = os.path.join(tmp, name + ".db")
    cfg = bg.gateway_cfg(1883, db, "FULL")  # no broker: MemIngest
    tweak_cfg(retain)(cfg)
    made = []
    c0 = []
    info = asyncio.run(bg._run_gateway(cfg, until_readings=n, ingest_factory=_timed(
        lambda c, s: made.append(MemIngest(msgs, c, s)) or made[0], c0)))
    return info["t_end"] - made[0].t_start, time.process_time() - c0[0], _results(db)


def run_mqtt(port, tmp, name, msgs, n, retain):
    """bench_gateway's steps: register the session, preload the broker, time the drain (and
    count the process CPU of the drain alone: the gateway; the publisher is done by then)."""
    db = os.path.join(tmp, name + ".db")
    cfg = bg.gateway_cfg(port, db, "FULL")
    tweak_cfg(retain)(cfg)
    cfg["mqtt"]["client_id"] = "bench-gw-" + name
    asyncio.run(bg._run_gateway(cfg, register_only=True))
    bg.raw_publish(port, msgs, "pub-" + name)
    time.sleep(0.2)
    c0 = []
    info = asyncio.run(bg._run_gateway(cfg, until_readings=n, ingest_factory=_timed(Ingest, c0)))
    return info["seconds"], time.process_time() - c0[0], _results(db)


def processing_cpu(tmp, msgs, n, retain):
    """Process CPU per reading of the gateway's message handling alone (decode, dedup, windows,
    watermarks, accounting): no event loop, no commit; the outputs are dropped every
    CKPT_MSGS messages as a checkpoint's snapshot would. The steadiest figure here."""
    from gateway.service import Gateway, Outputs
    cfg = bg.gateway_cfg(1883, os.path.join(tmp, "proc.db"), "FULL")
    tweak_cfg(retain)(cfg)
    gw = Gateway(cfg)
    now = int(time.time() * 1000)
    handle = gw._handle
    enc = [(t.encode(), p) for t, p in msgs]
    c0 = time.process_time()
    for i, (t, p) in enumerate(enc):
        handle(t, p, now)
        if i % CKPT_MSGS == CKPT_MSGS - 1:
            gw.out = Outputs()
            gw.dev_windows.export()
            gw.group_windows.export()
    return (time.process_time() - c0) / n * 1e6


def _connect(db, index=True):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(gstore.SCHEMA)
    if index:  # per-device time ranges row by row (the gateway's store.index_readings = true)
        conn.execute("CREATE INDEX IF NOT EXISTS readings_device_t ON readings (device, t)")
    return conn


def plain_loop(db, msgs, retain, index=True):
    """What a plain loop does: decode, drop seqs at or below the device's mark, add to window
    dicts, fire windows the device watermark passed, executemany every CKPT_MSGS messages.
    index: raw rows indexed by (device, t), so per-device time ranges can be queried (the
    gateway gets that from one reading_spans row per message); without it they cannot."""
    conn = _connect(db, index)
    hdr = struct.Struct(">BBBBIIqH")
    fmts = {}
    marks = {}  # (dev, boot) -> highest seq seen (in-order devices: a dict of marks is the dedup)
    wins = {}  # dev -> {(ch, start): [n, sum, sumsq, min, max]}
    maxt = {}
    due = {}  # dev -> smallest window end - 1 among its open windows
    delay = OOO_MS + 1
    raw, res = [], []
    t0 = time.perf_counter()
    c0 = time.process_time()

    def commit():
        conn.execute("BEGIN IMMEDIATE")
        if raw:
            conn.executemany(gstore.SQL["readings"], raw)
        if res:
            conn.executemany(gstore.SQL["window_results"], res)
        conn.execute("COMMIT")
        raw.clear()
        res.clear()

    for i, (topic, p) in enumerate(msgs):
        if topic.endswith("/data"):
            _m, _v, _t, idlen, boot, base, base_t, n = hdr.unpack_from(p)
            dev = p[22:22 + idlen].decode()
            f = fmts.get(n)
            if f is None:
                f = fmts[n] = struct.Struct(">" + "HiBBi" * n)
            flat = f.unpack_from(p, 22 + idlen)
            key = (dev, boot)
            mark = marks.get(key, -1)
            if base + n - 1 > mark:
                marks[key] = base + n - 1
                w = wins.get(dev)
                if w is None:
                    w = wins[dev] = {}
                mt = maxt.get(dev, 0)
                dd = due.get(dev)
                for j in range(0, 5 * n, 5):
                    seq = base + flat[j]
                    if seq <= mark:
                        continue
                    t = base_t + flat[j + 1]
                    ch, fl, v = flat[j + 2], flat[j + 3], flat[j + 4]
                    if retain:
                        raw.append((dev, boot, seq, t, ch, fl, v))
                    start = t - t % SIZE_MS
                    st = w.get((ch, start))
                    if st is None:
                        w[(ch, start)] = [1, v, v * v, v, v]
                        if dd is None or start + SIZE_MS - 1 < dd:
                            dd = start + SIZE_MS - 1
                    else:
                        st[0] += 1
                        st[1] += v
                        st[2] += v * v
                        if v < st[3]:
                            st[3] = v
                        if v > st[4]:
                            st[4] = v
                    if t > mt:
                        mt = t
                        wm = mt - delay
                        if dd is not None and wm >= dd:
                            dd = None
                            for k in sorted(w, key=lambda k: k[1]):
                                last = k[1] + SIZE_MS - 1
                                if wm >= last:
                                    cnt, s, sq, mn, mx = w.pop(k)
                                    var = cnt * sq - s * s
                                    res.append(("device", dev, k[0], k[1], k[1] + SIZE_MS, 0, cnt, s, mn, mx,
                                                s / cnt, (var ** 0.5) / cnt if var > 0 else 0.0, wm))
                                elif dd is None or last < dd:
                                    dd = last
                maxt[dev] = mt
                due[dev] = dd
        if i % CKPT_MSGS == CKPT_MSGS - 1:
            commit()
    commit()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    conn.close()
    return dt, cpu, _results(db)


def sqlite_ceiling(db, rows, chunked, index=True):
    """executemany of the raw rows alone, in transactions of the gateway's checkpoint size;
    index=False: without the (device, t) index of the schema (what that index costs)."""
    conn = _connect(db)
    if not index:
        conn.execute("DROP INDEX readings_device_t")
    per_tx = CKPT_MSGS * 50
    t0 = time.perf_counter()
    for i in range(0, len(rows), per_tx):
        conn.execute("BEGIN IMMEDIATE")
        if chunked:
            gstore._insert(conn, gstore.SQL["readings"], rows[i:i + per_tx])
        else:
            conn.executemany(gstore.SQL["readings"], rows[i:i + per_tx])
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return dt


def sqlite_batches(db, msgs):
    """One row per wire message (device, boot, first seq, count, base time, the readings as
    the payload's bytes) with an index on (device, t0): what fewer, wider rows would cost.
    Not a schema of the gateway (nothing decodes these rows); duplicates are not removed."""
    conn = _connect(db)
    conn.execute("CREATE TABLE batches (device TEXT, boot INTEGER, seq0 INTEGER, n INTEGER, t0 INTEGER, body BLOB)")
    conn.execute("CREATE INDEX batches_device_t0 ON batches (device, t0)")
    hdr = struct.Struct(">BBBBIIqH")
    t0 = time.perf_counter()
    batch = []
    for i, (topic, p) in enumerate(msgs):
        if topic.endswith("/data"):
            _m, _v, _t, idlen, boot, base, base_t, n = hdr.unpack_from(p)
            batch.append((p[22:22 + idlen].decode(), boot, base, n, base_t, p[22 + idlen:]))
        if len(batch) >= CKPT_MSGS or i == len(msgs) - 1:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO batches VALUES (?,?,?,?,?,?)", batch)
            conn.execute("COMMIT")
            batch = []
    dt = time.perf_counter() - t0
    conn.close()
    return dt


def loadavg():
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=600, help="event time per device")
    ap.add_argument("--full", action="store_true", help="the issue's workload: 1,000 devices x 3 x 1,000 s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mqtt", action="store_true", help="skip the mosquitto engine")
    ap.add_argument("--only", default="", help="comma list of engines: inproc,mqtt,plain,sqlite,proc")
    args = ap.parse_args(argv)
    if args.full:
        args.devices, args.channels, args.seconds = 1000, 3, 1000
    engines = set((args.only or "inproc,mqtt,plain,sqlite,proc").split(","))
    if args.no_mqtt:
        engines.discard("mqtt")
    t_gen = time.perf_counter()
    msgs, n, rows = workload(args.devices, args.channels, args.seconds)
    # The workload (3 million row tuples with --full, kept for the SQLite ceiling) is the
    # harness's: every full pass of the cyclic GC walked it, at a cost that grew with the
    # workload and fell on whichever engine collected more often. Frozen: no engine walks it.
    gc.collect()
    gc.freeze()
    dups = sum(len(wire.decode_data(p)[3]) for t, p in msgs if t.endswith("/data")) - n
    print("workload: %d devices x %d channels x %d s = %d readings + %d duplicates, %d messages (%.1f s to make)"
          % (args.devices, args.channels, args.seconds, n, dups, len(msgs), time.perf_counter() - t_gen))
    from gateway import accel
    print("gateway build: %s (EDGEFLOW_PURE_PYTHON=1: pure Python)" % accel.summary())
    print("load average before: %s (2 cores shared)" % loadavg())
    tmp = tempfile.mkdtemp(prefix="bench-cmp-")
    broker = port = None
    if "mqtt" in engines:
        broker, port = bg.start_broker(tmp)
        print("mosquitto on 127.0.0.1:%d: plaintext + anonymous on purpose (the data path, not TLS)" % port)
    rates = collections.defaultdict(list)
    cpu = collections.defaultdict(list)  # us of process CPU (all threads) per reading
    ref = {}
    bad = []
    try:
        for r in range(args.rounds):
            for retain in (True, False):
                tag = "raw" if retain else "noraw"
                runs = []
                if "plain" in engines:
                    runs.append(("plain", lambda nm: plain_loop(os.path.join(tmp, nm + ".db"), msgs, retain)))
                if "plain" in engines and retain:
                    runs.append(("plainnoidx", lambda nm: plain_loop(os.path.join(tmp, nm + ".db"), msgs, retain,
                                                                     index=False)))
                if "inproc" in engines:
                    runs.append(("inproc", lambda nm: run_inproc(tmp, nm, msgs, n, retain)))
                if "mqtt" in engines:
                    runs.append(("mqtt", lambda nm: run_mqtt(port, tmp, nm, msgs, n, retain)))
                if r % 2:
                    runs.reverse()  # alternate the order between rounds
                for eng, fn in runs:
                    nm = "%s-%s-%d" % (eng, tag, r)
                    dt, cpu_s, (res, raw) = fn(nm)  # CPU from the first message on (no set-up)
                    rates[(eng, tag)].append(n / dt)
                    cpu[(eng, tag)].append(cpu_s / n * 1e6)
                    ref.setdefault(tag, res)
                    want_raw = n if retain else 0
                    if res != ref[tag] or raw != want_raw:
                        bad.append("%s: %d window results (reference %d), %d raw rows (want %d)" % (
                            nm, len(res), len(ref[tag]), raw, want_raw))
                    for suffix in ("", "-wal", "-shm"):
                        try:
                            os.unlink(os.path.join(tmp, nm + ".db" + suffix))
                        except OSError:
                            pass
            if "proc" in engines:
                for tag, retain in (("raw", True), ("noraw", False)):
                    cpu[("proc", tag)].append(processing_cpu(tmp, msgs, n, retain))
            if "sqlite" in engines:
                for k, fn in (("sqlite", lambda db: sqlite_ceiling(db, rows, False)),
                              ("sqlite500", lambda db: sqlite_ceiling(db, rows, True)),
                              ("sqlite500noidx", lambda db: sqlite_ceiling(db, rows, True, index=False)),
                              ("sqlitebatch", lambda db: sqlite_batches(db, msgs))):
                    db = os.path.join(tmp, "%s-%d.db" % (k, r))
                    c0 = time.process_time()
                    rates[(k, "raw")].append(n / fn(db))
                    cpu[(k, "raw")].append((time.process_time() - c0) / n * 1e6)
                    for suffix in ("", "-wal", "-shm"):
                        if os.path.exists(db + suffix):
                            os.unlink(db + suffix)
            print("  round %d done, load average %s" % (r + 1, loadavg()), flush=True)
    finally:
        if broker:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(k):
        v = rates.get(k)
        return statistics.median(v) if v else None

    def fmt(k):
        v = rates.get(k)
        if not v:
            return "-"
        return "%.0fk (%s)" % (med(k) / 1000, " ".join("%.0f" % (x / 1000) for x in sorted(v)))

    print("\nreadings/s committed, median of %d rounds (all runs in k, sorted)" % args.rounds)
    print("%-36s %-28s %s" % ("engine", "raw readings kept", "without raw readings"))
    names = (("inproc", "gateway in-process (no MQTT)"), ("mqtt", "gateway through mosquitto"),
             ("plain", "plain Python loop, same results"),
             ("plainnoidx", "  the same without (device,t) index"), ("sqlite", "SQLite executemany (ceiling)"),
             ("sqlite500", "SQLite 500-row INSERTs (ceiling)"),
             ("sqlite500noidx", "  the same without (device,t) index"), ("sqlitebatch", "  one row per message (blob)"),
             ("proc", "gateway message handling alone"))
    for k, label in names:
        if rates.get((k, "raw")) or rates.get((k, "noraw")):
            print("%-36s %-28s %s" % (label, fmt((k, "raw")), fmt((k, "noraw"))))
    print("\nprocess CPU per reading, all threads, median (us; mosquitto's own CPU not included): the figure to "
          "compare on a loaded machine")
    for k, label in names:
        if cpu.get((k, "raw")) or cpu.get((k, "noraw")):
            print("%-36s %-28s %s" % (label, *("%.2f" % statistics.median(cpu[(k, tag)]) if cpu.get((k, tag))
                                              else "-" for tag in ("raw", "noraw"))))
    print("\nratios (medians)")
    for a, b, label in (("inproc", "plain", "in-process / plain loop   (goal >= 1.0)"),
                        ("inproc", "plainnoidx", "in-process / plain loop without its index"),
                        ("mqtt", "inproc", "mosquitto / in-process    (goal >= 0.8)"),
                        ("inproc", "sqlite", "in-process / SQLite executemany")):
        vals = []
        for tag in ("raw", "noraw"):
            x, y = med((a, tag)), med((b, tag))
            vals.append("%.2f" % (x / y) if x and y else "-")
        print("  %-44s raw %s   noraw %s" % (label, vals[0], vals[1]))
    print("ratios by CPU per reading (b's CPU / a's CPU: > 1 means a costs less)")
    for a, b, label in (("inproc", "plain", "in-process vs plain loop"),
                        ("inproc", "plainnoidx", "in-process vs plain loop without its index"),
                        ("mqtt", "inproc", "mosquitto vs in-process")):
        vals = []
        for tag in ("raw", "noraw"):
            x, y = cpu.get((a, tag)), cpu.get((b, tag))
            vals.append("%.2f" % (statistics.median(y) / statistics.median(x)) if x and y else "-")
        print("  %-44s raw %s   noraw %s" % (label, vals[0], vals[1]))
    print("load average after: %s" % loadavg())
    if bad:
        print("RESULTS DIFFER:\n  " + "\n  ".join(bad))
        return 1
    print("window results equal across engines (%s), raw rows = unique readings"
          % ", ".join("%s %d" % (k, len(v)) for k, v in sorted(ref.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
