"""Fleet simulator: N virtual devices running the REAL firmware App on the simulated HAL.

    edgeflow-fleet --broker 127.0.0.1:1883 --devices 100 --duration 60 --truth truth.db
    edgeflow-fleet --spawn --devices 1000 --duration 60 --sample-ms 1000     # own broker + gateway

Every device is `firmware.app.App(config, firmware.hal_sim.SimHal(...))` in one asyncio loop:
no firmware logic is reimplemented here. What this module adds:

- Ground truth. Each device's flash is `FailingFS(TruthFS(MemFS))`. `TruthFS` parses every
  complete outbox frame (CRC-valid, the same `firmware.outbox.read_frame`) written to a
  segment file and records it: (device, boot, seq, kind, t, flags, channel, value). That is
  exactly "every record that reached flash", the set the device owes the gateway: a torn
  frame of a power cut is not complete, so not recorded (and the device's own scan drops it
  at the next boot); the RAM batch lost in a power cut never reached flash, so it is not
  owed. After the run, whatever is still on a device's flash and unacked is recorded as
  `held` (owed, but still on the device, not lost). Clock mappings (boot_epoch per boot)
  are recorded so records stored unsynced and converted at send time can be checked.
  `tools/groundtruth.py` compares this with the gateway's SQLite.
- Faults, scripted (`--faults`) or random (`--random-faults K --seed S`):
    outage@AT+DUR[:SEL]   Wi-Fi outage of the selected devices (SEL: all, 3, 0-9, 0.25 = a fraction)
    storm@AT+DUR          the whole site's Wi-Fi down, then every device back at once with a backlog
    reboot@AT[:SEL]       graceful reboot (App.stop, SimHal.reboot, new App on the same flash)
    powercut@AT[:SEL]     power cut (App.kill: the RAM batch is lost, the broker publishes the will)
    tornwrite@AT[:SEL]    power cut in the middle of a flash write (FailingFS byte budget)
    dup@AT+DUR[:P]        a proxy republishes a fraction P of data messages, delayed and reordered
    brokerrestart@AT+DUR  broker down for DUR s (needs --spawn or a Site)
    gwkill@AT+DUR         gateway kill -9, restarted after DUR s (needs --spawn or a Site)
    reflash@AT[:SEL]      re-flash: the device drains (sensors quiet), loses power, its flash is
                          erased (new instance id, new boot counter) and it starts again
    forgeack@AT+DUR       an attacker publishes forged acks (wrong MAC) and replays recorded genuine
                          acks to every device that said hello (tools/fleet.py AckForger)
    gwflap@AT+DUR[:N]     N gateway kill -9s within DUR s, each restarted 0-0.5 s later, some
                          killed again during start-up / restore (needs --spawn or a Site)
    gwstate@AT+DUR[:N]    the retained gateway state flipped offline/online N times within DUR s
                          (published by another client, like a flapping or forged gateway state)
  Clock faults are per device at boot: --skew-devices N --skew-ms MS (NTP answers with an error),
  --unsynced-devices N (no NTP and no gateway beacon: records stay FLAG_UNSYNCED).
- Site: a mosquitto (tools/brokerconf.py) and the gateway (`python -m gateway.cli run`) as
  subprocesses on free loopback ports, restartable, killable with SIGKILL.
- Security on, like a real site: the Site's broker is provisioned (tools/provision.py: TLS,
  passwords, ACLs); every simulated device gets its own credentials, ack key and the CA file
  on its flash (Fleet(..., broker=site.mq)); the gateway gets its credentials and the devices
  file. Against an external broker: --fleet-dir FLEET (an edgeflow-provision folder).
"""
import argparse
import asyncio
import io
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.broker import Mosquitto  # noqa: E402
from tools.proc import exit_on_sigterm, popen  # noqa: E402
from shared import wire  # noqa: E402
from firmware.app import App  # noqa: E402
from firmware.hal_sim import SimHal, MemFS, FailingFS, PowerCut  # noqa: E402
from firmware import obframe as _outbox  # noqa: E402  (the frame reader)
from firmware import hal as _hal  # noqa: E402

PY = sys.executable


# ====================================================================== ground truth recording


class TruthLog:
    """In-memory sink for what devices stored, flushed to a SQLite truth file."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
    CREATE TABLE IF NOT EXISTS records (device TEXT, boot INTEGER, seq INTEGER, kind INTEGER, t INTEGER,
        flags INTEGER, channel INTEGER, value INTEGER, extra TEXT, PRIMARY KEY (device, boot, seq));
    CREATE TABLE IF NOT EXISTS epochs (device TEXT, boot INTEGER, boot_epoch INTEGER,
        PRIMARY KEY (device, boot, boot_epoch));
    CREATE TABLE IF NOT EXISTS held (device TEXT, boot INTEGER, seq INTEGER, PRIMARY KEY (device, boot, seq));
    CREATE TABLE IF NOT EXISTS events (at REAL, kind TEXT, detail TEXT);
    """

    def __init__(self, path=None):
        self.path = path
        self.pending = []
        self.epochs = set()
        self.pending_epochs = []
        self.count = 0
        self.events = []
        self.db = None
        if path:
            if os.path.exists(path):
                os.remove(path)
            self.db = sqlite3.connect(path)
            self.db.executescript(self.SCHEMA)

    def record(self, dev, rec):
        boot, seq, t, kind, flags, body = rec
        if kind == wire.KIND_READING:
            ch, v, extra = body[0], body[1], None
        elif kind == wire.KIND_GAP:
            ch, v, extra = None, None, json.dumps([body[0], [list(r) for r in body[1]]])
        elif kind == wire.KIND_WINDOW:
            ch, v, extra = body[0], None, None
        else:
            ch, v, extra = None, None, None
        self.pending.append((dev, boot, seq, kind, t, flags, ch, v, extra))
        self.count += 1
        if len(self.pending) >= 20000:
            self.flush()

    def epoch(self, dev, boot, be):
        k = (dev, boot, be)
        if be is not None and k not in self.epochs:
            self.epochs.add(k)
            self.pending_epochs.append(k)

    def event(self, kind, detail=""):
        self.events.append((time.time(), kind, str(detail)))

    def flush(self):
        if self.db is None:
            self.pending = []
            return
        # INSERT OR IGNORE: a compaction rewrites frames already recorded (same identity)
        self.db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?)", self.pending)
        self.db.executemany("INSERT OR IGNORE INTO epochs VALUES (?,?,?)", self.pending_epochs)
        self.db.executemany("INSERT INTO events VALUES (?,?,?)", self.events)
        self.db.commit()
        self.pending, self.pending_epochs, self.events = [], [], []

    def meta(self, k, v):
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (k, json.dumps(v)))
            self.db.commit()

    def held(self, rows):
        if self.db is not None:
            self.db.executemany("INSERT OR IGNORE INTO held VALUES (?,?,?)", rows)
            self.db.commit()

    def close(self):
        self.flush()
        if self.db is not None:
            self.db.close()
            self.db = None


def _is_segment(path, d):
    nm = path[len(d) + 1:] if path.startswith(d + "/") else None
    return nm is not None and len(nm) == 9 and nm[0] in "st" and nm[1:].isdigit()


class _TruthFile:
    def __init__(self, tfs, f):
        self.tfs = tfs
        self.f = f
        self.buf = b""

    def write(self, b):
        n = self.f.write(b)
        self.buf += bytes(b)
        bio = io.BytesIO(self.buf)
        used = 0
        while True:
            r = _outbox.read_frame(bio)
            if r is None:
                break
            used += len(r[0])
            self.tfs.sink(r[1])
        self.buf = self.buf[used:]
        return n

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


class TruthFS:
    """Wraps the device's flash: every complete outbox frame written to a segment (or a
    compaction's temp file) is handed to sink(record). Everything else passes through."""

    def __init__(self, inner, sink, obdir="ob"):
        self.inner = inner
        self.sink = sink
        self.obdir = obdir

    def open(self, path, mode):
        f = self.inner.open(path, mode)
        if ("a" in mode or "w" in mode) and _is_segment(path, self.obdir):
            return _TruthFile(self, f)
        return f

    def __getattr__(self, k):
        return getattr(self.inner, k)


# ====================================================================== devices


def device_config(dev, port, sample_ms=250, window_ms=10000, status_every_s=10, host="127.0.0.1", secrets=None,
                  **over):
    """secrets: the device's provisioned {"config": {...}} (credentials, tls, ack_key); None:
    an insecure device (plaintext, anonymous)."""
    cfg = {
        "device_id": dev,
        "broker": {"host": host, "port": port, "keepalive_s": 10, "timeout_ms": 3000},
        "sample_ms": sample_ms, "status_every_s": status_every_s, "watchdog_ms": 0,
        "channels": ["temp", "hum", "pot"],
        "outbox": {"batch_records": 16, "batch_ms": 500, "ack_persist_ms": 1000, "max_bytes": 262144},
        "uplink": {"backoff_base_ms": 200, "backoff_cap_ms": 4000, "resend_ms": 5000, "wifi_timeout_ms": 2000},
        "clock": {"ntp_every_s": 600, "use_beacon": True},
        "window": {"size_ms": window_ms},
        "rules": [{"id": "spike", "type": "threshold", "channel": "temp", "enter": 30, "leave": 25, "severity": 2}],
        "anomaly": {"zscore": {"channels": ["hum"], "window": 16, "k": 4, "min_std": 0.5, "cooldown_ms": 5000}},
    }
    if secrets is None:
        cfg["insecure"] = True
    else:
        for k, v in secrets["config"].items():
            cfg[k] = dict(cfg[k], **v) if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        cfg["broker"]["host"], cfg["broker"]["port"] = host, port
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = dict(cfg[k], **v)
        else:
            cfg[k] = v
    return cfg


class Device:
    def __init__(self, fleet, idx, dev_id, cfg, seed, ntp_ok=True, ntp_error_ms=0, files=None):
        self.fleet = fleet
        self.idx = idx
        self.id = dev_id
        self.cfg = cfg
        self.files = files or {}
        self.mem = self._flash()
        self.tfs = TruthFS(self.mem, self._stored, cfg.get("outbox", {}).get("dir", "ob"))
        self.ffs = FailingFS(self.tfs)
        self.hal = SimHal(seed=seed, ntp_ok=ntp_ok, fs=self.ffs, console=False)
        self.hal.ntp_error_ms = ntp_error_ms
        self.app = None
        self.task = None
        self.busy = False  # a reboot / power cut in progress
        self.boots = 0
        self.power_cuts = 0
        self.drained = False
        self.torn_tails = 0  # torn outbox frames the next boot's scan found (and skipped)
        self.reflashes = 0
        self.since_reflash = []  # (boot, seq, value) of readings stored since the last re-flash

    def _flash(self):
        """A freshly deployed flash: what the deploy puts next to config.json (the CA)."""
        mem = MemFS()
        for path, text in self.files.items():
            f = mem.open(path.lstrip("/"), "wb")
            f.write(text.encode())
            f.close()
        return mem

    def _stored(self, rec):
        self.fleet.truth.record(self.id, rec)
        if self.reflashes and rec[3] == wire.KIND_READING and len(self.since_reflash) < 100000:
            self.since_reflash.append((rec[0], rec[1], rec[5][1]))  # boot, seq, value

    def _hook_clock(self, app):
        ck = app.clock
        orig = ck.set_time
        truth = self.fleet.truth
        dev = self.id

        def set_time(epoch_ms, source, at_boot_ms=None):
            r = orig(epoch_ms, source, at_boot_ms)
            truth.epoch(dev, ck.boot, ck.boot_epoch)
            return r
        ck.set_time = set_time

    def start(self):
        app = App(self.cfg, self.hal)
        app._boot()
        self._hook_clock(app)
        self.app = app
        self.boots += 1
        self.task = asyncio.ensure_future(self._run(app))

    async def _run(self, app):
        try:
            await app.run()
        except PowerCut:
            pass
        except Exception as e:  # noqa: BLE001 - a device crash is reported, never hidden
            self.fleet.errors.append("%s: %r" % (self.id, e))

    async def _end(self, kill):
        app = self.app
        if kill:
            app.kill()
        else:
            app.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except asyncio.TimeoutError:
            app.kill()
            await asyncio.wait_for(self.task, 5)

    async def reboot(self, kill=False):
        if self.busy:
            return
        self.busy = True
        try:
            await self._end(kill)
            self.hal.reboot()
            self.start()
        finally:
            self.busy = False

    async def reflash(self, max_wait=15.0):
        """Erase the flash and start again with the same device id (and the same config and
        keys), as `edgeflow-deploy --erase` would. First the sensors go quiet until every
        record is acked, so the erase destroys nothing owed."""
        if self.busy:
            return
        self.busy = True
        try:
            sigs = list(self.hal.signals.values())
            for sg in sigs:
                sg.missing = True
            t0 = time.monotonic()
            while time.monotonic() - t0 < max_wait and self.app.outbox.unacked():
                await asyncio.sleep(0.05)
            await self._end(True)
            self.mem = self._flash()  # erased, then deployed again (config, CA)
            self.tfs = TruthFS(self.mem, self._stored, self.cfg.get("outbox", {}).get("dir", "ob"))
            self.ffs = FailingFS(self.tfs)
            self.hal.fs = self.ffs
            self.hal.reboot()
            for sg in sigs:
                sg.missing = False
            self.reflashes += 1
            self.since_reflash = []
            self.start()
        finally:
            self.busy = False

    async def torn_write(self, max_wait=5.0):
        """Cut the power within the next few hundred bytes written to flash (mid-frame)."""
        if self.busy:
            return
        self.busy = True
        try:
            ffs = self.ffs
            ffs.budget = ffs.written + 1 + self.fleet.rng.randrange(400)
            t0 = time.monotonic()
            while not ffs.dead and time.monotonic() - t0 < max_wait:
                await asyncio.sleep(0.005)
            await self._end(True)
            self.power_cuts += 1
            self.ffs = FailingFS(self.tfs)  # power back: same flash, a fresh budget
            self.hal.fs = self.ffs
            self.hal.reboot()
            self.start()
            self.torn_tails += self.app.outbox.torn
        finally:
            self.busy = False

    def held_rows(self):
        """(device, boot, seq) of records still on flash and unacked (after the App ended)."""
        acked = dict(self.app.outbox.acked) if self.app and self.app.outbox else {}
        d = self.cfg.get("outbox", {}).get("dir", "ob")
        out = []
        for path in sorted(self.mem.files):
            if path.startswith(d + "/s") and _is_segment(path, d):
                bio = io.BytesIO(bytes(self.mem.files[path]))
                while True:
                    r = _outbox.read_frame(bio)
                    if r is None:
                        break
                    boot, seq = r[1][0], r[1][1]
                    if seq > acked.get(boot, -1):
                        out.append((self.id, boot, seq))
        return out


def _start_rogue(obj, port, broker, client_id, service_user, subs):
    """The MQTT client and pump thread of a rogue (Duplicator, AckForger): subscribes to subs,
    hands messages to obj._on_message, runs obj._pump; a trusted service user on a secure broker."""
    import paho.mqtt.client as paho
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="%s-%d" % (client_id, os.getpid()))
    c.on_connect = lambda c, u, f, rc, pr=None: c.subscribe(subs)  # [(topic, qos)]
    c.on_message = obj._on_message
    c.reconnect_delay_set(0.1, 1)
    if broker is not None and not broker.insecure:
        broker.paho(c, broker.service(service_user))
    obj.client = c
    c.connect_async("127.0.0.1", port, 30)
    c.loop_start()
    obj._stop = threading.Event()
    obj._th = threading.Thread(target=obj._pump, daemon=True)
    obj._th.start()


class Duplicator:
    """A rogue proxy: subscribes to every device's data topic and republishes a fraction of
    the messages later (random delay, so also out of order). Dedup must absorb them."""

    def __init__(self, port, prefix="edgeflow", p=0.2, delay_s=2.0, seed=1, broker=None):
        self.p = p
        self.delay = delay_s
        self.rng = random.Random(seed)
        self.topics = wire.Topics(prefix)
        self.held = []
        self.lock = threading.Lock()
        self.sent = 0
        self.seen = 0
        self.active = False
        # a trusted relay user (readwrite on the tree): the broker forces client id = user
        _start_rogue(self, port, broker, "fleet-dup", "edgeflow-test-relay", [(self.topics.sub_data, 1)])

    def _on_message(self, c, u, msg):
        if not self.active or msg.retain:
            return
        self.seen += 1
        if self.rng.random() < self.p:
            with self.lock:
                self.held.append((time.monotonic() + self.rng.random() * self.delay, msg.topic, bytes(msg.payload)))

    def _pump(self):
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self.lock:
                due = [h for h in self.held if h[0] <= now]
                self.held = [h for h in self.held if h[0] > now]
            self.rng.shuffle(due)
            for _at, topic, payload in due:
                self.client.publish(topic, payload, 1)
                self.sent += 1

    def stop(self):
        self._stop.set()
        self._th.join(2)
        self.client.loop_stop()
        self.client.disconnect()


def provision_devices(broker, ids):
    """{dev: secrets} for ids, provisioning the missing ones ({} when broker is None/insecure)."""
    if broker is None or getattr(broker, "insecure", False):
        return {}
    if hasattr(broker, "add_devices"):  # a running launcher: one reload for all
        broker.add_devices(ids)
    else:
        known = set(broker.devices())
        new = [d for d in ids if d not in known]
        if new:
            broker.add_many(new)
    return {d: broker.device_secrets(d) for d in ids}


class AckForger:
    """An attacker on the broker (issue 12): learns each device's boot, next seq and nonce from
    its hellos, records its genuine acks, and every `period` s publishes to its ack topic
    (1) a forged ack of everything up to next_seq + 1000 with the current nonce and a wrong MAC
    (also retained once), and (2) the genuine acks it recorded, replayed. Devices must count and
    ignore (1), and (2) once their nonce moved on; nothing may be deleted."""

    def __init__(self, port, prefix="edgeflow", period=0.5, seed=1, broker=None):
        self.topics = wire.Topics(prefix)
        self.period = period
        self.rng = random.Random(seed)
        self.hello = {}  # dev -> (boot, next_seq, nonce)
        self.acks = {}  # dev -> genuine acks seen (bounded)
        self.lock = threading.Lock()
        self.forged = self.replayed = 0
        self.retained = set()
        # the ACL lets only the gateway publish acks: the attacker holds a trusted
        # credential (a compromised broker or service account), yet has no ack key
        _start_rogue(self, port, broker, "fleet-forger", "edgeflow-test-forger",
                     [(self.topics.sub_hello, 1), (self.topics.prefix + "/d/+/ack", 1)])

    def _on_message(self, c, u, msg):
        try:
            dev, leaf = self.topics.parse(msg.topic)
        except wire.WireError:
            return
        with self.lock:
            if leaf == "hello":
                try:
                    h = wire.decode_hello(msg.payload)
                except wire.WireError:
                    return
                self.hello[dev] = (h["boot"], h["next_seq"], h["nonce"])
            elif leaf == "ack" and not msg.retain:
                a = self.acks.setdefault(dev, [])
                if len(a) < 200:
                    a.append(bytes(msg.payload))

    def _pump(self):
        while not self._stop.wait(self.period):
            with self.lock:
                targets = list(self.hello.items())
                old = dict((d, list(a)) for d, a in self.acks.items())
            for dev, (boot, nxt, nonce) in targets:
                p = bytearray(wire.encode_ack(dev, boot, nxt + 1000, int(time.time() * 1000), 10 ** 6, nonce,
                                              os.urandom(32)))
                retain = dev not in self.retained
                self.retained.add(dev)
                self.client.publish(self.topics.ack(dev), bytes(p), 1, retain)
                self.forged += 1
                for a in old.get(dev, [])[-23:-3]:  # but the newest 3: their nonce is old by now
                    self.client.publish(self.topics.ack(dev), a, 1)
                    self.replayed += 1

    def stop(self):
        self._stop.set()
        self._th.join(2)
        for dev in self.retained:  # clear the retained forgeries
            self.client.publish(self.topics.ack(dev), b"", 1, True)
        time.sleep(0.2)
        self.client.loop_stop()
        self.client.disconnect()


class Fleet:
    """N devices in this process's asyncio loop."""

    def __init__(self, n, port, truth_path=None, seed=1, sample_ms=250, window_ms=10000, prefix_id="dev",
                 skew_devices=0, skew_ms=0, unsynced_devices=0, host="127.0.0.1", cfg_over=None, spikes=True,
                 dev_over=None, broker=None):
        """cfg_over: config overrides for every device (a section dict is merged into the
        default section); dev_over: {index: overrides} for single devices, applied after
        cfg_over, e.g. {0: {"outbox": {"max_bytes": 8192, "segment_bytes": 2048}}}.
        broker: where the devices' secrets come from: a tools.broker.Mosquitto (provisions
        them and reloads) or a tools.provision.Fleet folder; None = insecure devices."""
        self.port = port
        self.broker = broker
        ids = ["%s-%04d" % (prefix_id, i) for i in range(n)]
        secrets = provision_devices(broker, ids)
        self.rng = random.Random(seed)
        self.truth = TruthLog(truth_path)
        self.errors = []
        self.devices = []
        self.dup = None
        cfg_over = cfg_over or {}
        for i in range(n):
            dev = ids[i]
            kw = dict(cfg_over)
            ntp_ok, err = True, 0
            if i < skew_devices:
                err = skew_ms if i % 2 == 0 else -skew_ms
            elif i < skew_devices + unsynced_devices:
                ntp_ok = False
                kw["clock"] = {"ntp_every_s": 0, "use_beacon": False}
            for k, v in ((dev_over or {}).get(i) or {}).items():
                kw[k] = dict(kw[k], **v) if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
            sec = secrets.get(dev)
            cfg = device_config(dev, port, sample_ms, window_ms, host=host, secrets=sec, **kw)
            d = Device(self, i, dev, cfg, seed * 100003 + i, ntp_ok, err, sec and sec.get("files"))
            if spikes and i % 5 == 0:
                sig = d.hal.signals[_hal.CH_TEMP]
                sig.spike_every, sig.spike = 37 + i % 13, 12000
            self.devices.append(d)
        self.truth.meta("devices", [d.id for d in self.devices])
        self.truth.meta("seed", seed)
        self.started = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self, stagger_s=1.0):
        self.started = time.monotonic()
        n = len(self.devices)
        for i, d in enumerate(self.devices):
            d.start()
            if stagger_s and n > 1:
                await asyncio.sleep(stagger_s / n)

    def select(self, sel):
        """'all', an index '3', a range '0-9', a fraction '0.25' (seeded random pick), or a list."""
        devs = self.devices
        if sel is None or sel == "all":
            return list(devs)
        if isinstance(sel, (list, tuple)):
            return [devs[i] for i in sel]
        sel = str(sel)
        if "-" in sel:
            a, b = sel.split("-")
            return devs[int(a):int(b) + 1]
        if "." in sel:
            k = max(1, int(round(float(sel) * len(devs))))
            return self.rng.sample(devs, k)
        return [devs[int(sel)]]

    def wifi(self, devs, up):
        for d in devs:
            d.hal.set_wifi(up)
        self.truth.event("wifi_" + ("up" if up else "down"), len(devs))

    async def reboot(self, devs, kill=False):
        self.truth.event("powercut" if kill else "reboot", [d.id for d in devs])
        await asyncio.gather(*[d.reboot(kill) for d in devs])

    async def torn_write(self, devs):
        self.truth.event("tornwrite", [d.id for d in devs])
        await asyncio.gather(*[d.torn_write() for d in devs])

    def start_dup(self, p=0.2, delay_s=2.0, prefix="edgeflow"):
        if self.dup is None:
            self.dup = Duplicator(self.port, prefix, p, delay_s, self.rng.randrange(1 << 30), self.broker)
            time.sleep(0.3)
        self.dup.p = p
        self.dup.active = True
        self.truth.event("dup_on", p)

    def stop_dup(self):
        if self.dup is not None:
            self.dup.active = False
            self.truth.event("dup_off", self.dup.sent)

    def stats(self):
        online = samples = unacked = sent = replayed = cep = anomalies = 0
        for d in self.devices:
            a = d.app
            if a is None or a.uplink is None:
                continue
            if a.uplink.session and not a.killed:
                online += 1
            samples += a.c["samples"]
            cep += a.c["cep"]
            anomalies += a.c["anomalies"]
            sent += a.uplink.c["sent"]
            replayed += a.uplink.c["replayed"]
            unacked += a.outbox.unacked()
        return {"devices": len(self.devices), "online": online, "samples": samples, "stored": self.truth.count,
                "sent": sent, "replayed": replayed, "unacked": unacked, "cep": cep, "anomalies": anomalies,
                "errors": len(self.errors)}

    async def quiesce(self, timeout=60.0, on_tick=None):
        """Stop sampling (sensors go silent), bring every link up, and power each device off
        (App.kill) as soon as its outbox is fully acked (nothing in RAM, nothing unacked on
        flash), so nothing it stored is left behind. Returns True if every device drained
        within the timeout; the others are powered off by shutdown() and what they still
        hold is recorded as held."""
        self.stop_dup()
        for d in self.devices:
            d.hal.set_wifi(True)
            for s in d.hal.signals.values():
                s.missing = True
        t0 = time.monotonic()
        left = list(self.devices)
        while left and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.2)
            if on_tick:
                on_tick()
            rest = []
            for d in left:
                ob = d.app.outbox if d.app is not None else None
                if not d.busy and ob is not None and ob.unacked() == 0:
                    d.app.kill()
                    d.drained = True
                else:
                    rest.append(d)
            left = rest
        return not left

    async def shutdown(self):
        """Power every device off (App.kill: the RAM batch is not owed), record what is
        still held on flash, write the truth file."""
        for d in self.devices:
            if d.app is not None:
                d.app.kill()
        await asyncio.gather(*[d.task for d in self.devices if d.task], return_exceptions=True)
        held = []
        for d in self.devices:
            held.extend(d.held_rows())
        self.truth.held(held)
        if self.dup is not None:
            self.dup.stop()
            self.truth.event("dup_total", self.dup.sent)
        self.truth.meta("errors", self.errors)
        self.truth.flush()
        return held


# ====================================================================== site: broker + gateway


def gateway_toml(port, db, window_ms=10000, lateness_ms=20000, ooo_ms=2000, idle_ms=15000, groups=True,
                 extra=None):
    sec = {
        "mqtt": {"host": "127.0.0.1", "port": port},
        "store": {"path": db},
        "watermark": {"out_of_orderness_ms": ooo_ms, "idle_timeout_ms": idle_ms},
        "windows": {"size_ms": window_ms, "allowed_lateness_ms": lateness_ms},
        "metrics": {"port": 0},
        "web": {"port": 0},
        "log": {"level": "info"},
    }
    for s, kv in (extra or {}).items():
        sec.setdefault(s, {}).update(kv)
    lines = []
    for s, kv in sec.items():
        lines.append("[%s]" % s)
        for k, v in kv.items():
            lines.append("%s = %s" % (k, json.dumps(v)))
        lines.append("")
    if groups:
        lines += ["[[windows.groups]]", 'name = "site-temp"', 'devices = ["*"]', "channel = 0", ""]
    return "\n".join(lines)


def gateway_windows(window_ms=10000, lateness_ms=20000, groups=True):
    """The window config the checker needs (same as gateway_toml writes)."""
    return {"size_ms": window_ms, "offset_ms": 0, "allowed_lateness_ms": lateness_ms,
            "groups": [{"name": "site-temp", "devices": ["*"], "channel": 0}] if groups else []}


def vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


class Site:
    """mosquitto + gateway subprocesses on 127.0.0.1, in workdir. Every process it starts
    is stopped by close() (also on errors: use it in try/finally)."""

    def __init__(self, workdir, port=None, window_ms=10000, lateness_ms=20000, ooo_ms=2000, idle_ms=15000,
                 groups=True, gw_extra=None, broker=None, insecure=False):
        """broker: an object with .port, .start(), .stop() (e.g. tests/conftest.py's Broker)
        to use instead of a mosquitto of our own."""
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        # tools.broker.Mosquitto (tests pass theirs); its own process group so that a
        # terminal's Ctrl-C reaches only the demo, which then stops it in order
        self.mq = broker if broker is not None else Mosquitto(os.path.join(self.dir, "broker"), port, new_session=True,
                                                              insecure=insecure)
        self.port = self.mq.port
        self.db = os.path.join(self.dir, "edgeflow.db")
        self.gw_conf = os.path.join(self.dir, "gateway.toml")
        # the gateway's credentials, CA and devices file (or insecure, for an insecure broker)
        extra = self.mq.gateway_config() if hasattr(self.mq, "gateway_config") else {"security": {"insecure": True}}
        for sec, kv in (gw_extra or {}).items():
            extra.setdefault(sec, {}).update(kv)
        with open(self.gw_conf, "w") as f:
            f.write(gateway_toml(self.port, self.db, window_ms, lateness_ms, ooo_ms, idle_ms, groups, extra))
        self.windows = gateway_windows(window_ms, lateness_ms, groups)
        self.broker = None
        self.gateway = None
        self.gw_starts = 0
        self.gw_kills = 0
        self.broker_restarts = 0
        self.peak = {"broker_kb": 0, "gateway_kb": 0}

    # ---- broker
    def start_broker(self):
        if self.mq.proc is None:
            self.mq.start()
        self.broker = self.mq.proc
        return self

    def stop_broker(self):
        self._note_peak()
        self.mq.stop()
        self.broker = None

    def restart_broker(self, down_s=0.0):
        self.stop_broker()
        time.sleep(down_s)
        self.start_broker()
        self.broker_restarts += 1

    # ---- gateway
    def start_gateway(self):
        log = open(os.path.join(self.dir, "gateway.log"), "ab")
        self._started_mark = self._started_lines()
        self.gateway = popen([PY, "-m", "gateway.cli", "run", "-c", self.gw_conf], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.gw_starts += 1
        return self

    def kill_gateway(self):
        """kill -9: no final checkpoint, no offline state (the broker publishes its will)."""
        self._note_peak()
        if self.gateway and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGKILL)
            self.gateway.wait()
        self.gateway = None
        self.gw_kills += 1

    def wait_started(self, timeout=10.0):
        """Wait until the running gateway logged gateway_started (connected, state restored)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and self.gateway_alive():
            if self._started_lines() > self._started_mark:
                return True
            time.sleep(0.05)
        return False

    def _started_lines(self):
        try:
            with open(os.path.join(self.dir, "gateway.log"), "rb") as f:
                return f.read().count(b"gateway_started")
        except OSError:
            return 0

    def stop_gateway(self, timeout=30):
        self._note_peak()
        _stop(self.gateway, timeout)
        rc = self.gateway.returncode if self.gateway else None
        self.gateway = None
        return rc

    def _note_peak(self):
        for k, p in (("broker_kb", self.broker), ("gateway_kb", self.gateway)):
            if p is not None and p.poll() is None:
                v = vm_hwm_kb(p.pid)
                if v and v > self.peak[k]:
                    self.peak[k] = v

    def gateway_alive(self):
        return self.gateway is not None and self.gateway.poll() is None

    def close(self):
        _stop(self.gateway, 10)
        self.mq.stop()
        self.gateway = self.broker = None


def _stop(p, timeout=10):
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ====================================================================== scenarios


class Event:
    def __init__(self, kind, at, dur=0.0, arg=None):
        self.kind, self.at, self.dur, self.arg = kind, float(at), float(dur), arg

    def __repr__(self):
        return "%s@%g%s%s" % (self.kind, self.at, "+%g" % self.dur if self.dur else "",
                              ":%s" % self.arg if self.arg is not None else "")


KINDS = ("outage", "storm", "reboot", "powercut", "tornwrite", "reflash", "dup", "brokerrestart", "gwkill", "gwflap",
         "gwstate", "forgeack")


def parse_faults(spec):
    """'outage@10+5:0-4,storm@30+8,gwkill@45+3' -> [Event]"""
    out = []
    for part in filter(None, (s.strip() for s in (spec or "").split(","))):
        kind, _, rest = part.partition("@")
        if kind not in KINDS:
            raise ValueError("unknown fault %r (known: %s)" % (kind, ", ".join(KINDS)))
        rest, _, arg = rest.partition(":")
        at, _, dur = rest.partition("+")
        out.append(Event(kind, float(at), float(dur or 0), arg or None))
    return sorted(out, key=lambda e: e.at)


def random_faults(k, duration, rng, site=True):
    kinds = ["outage", "reboot", "powercut", "tornwrite", "dup"] + (["brokerrestart", "gwkill"] if site else [])
    out = []
    for _ in range(k):
        kind = rng.choice(kinds)
        at = rng.uniform(0.1, 0.6) * duration
        dur = {"outage": rng.uniform(2, 10), "dup": rng.uniform(3, 10), "brokerrestart": rng.uniform(1, 4),
               "gwkill": rng.uniform(1, 4)}.get(kind, 0)
        arg = {"outage": "0.2", "reboot": "0.05", "powercut": "0.05", "tornwrite": "0.05", "dup": "0.2"}.get(kind)
        out.append(Event(kind, round(at, 1), round(dur, 1), arg))
    return sorted(out, key=lambda e: e.at)


async def run_event(ev, fleet, site=None, log=None):
    """Apply one fault; returns when it is over (outages and restarts last ev.dur)."""
    loop = asyncio.get_running_loop()
    if log:
        log("fault: %r" % ev)
    fleet.truth.event(ev.kind, repr(ev))
    if ev.kind in ("outage", "storm"):
        devs = fleet.select("all" if ev.kind == "storm" else (ev.arg or "all"))
        fleet.wifi(devs, False)
        await asyncio.sleep(ev.dur)
        fleet.wifi(devs, True)
    elif ev.kind == "reboot":
        await fleet.reboot(fleet.select(ev.arg or "0"))
    elif ev.kind == "powercut":
        await fleet.reboot(fleet.select(ev.arg or "0"), kill=True)
    elif ev.kind == "tornwrite":
        await fleet.torn_write(fleet.select(ev.arg or "0"))
    elif ev.kind == "reflash":
        devs = fleet.select(ev.arg or "0")
        fleet.truth.event("reflash", [d.id for d in devs])
        await asyncio.gather(*[d.reflash() for d in devs])
    elif ev.kind == "dup":
        fleet.start_dup(float(ev.arg or 0.2))
        await asyncio.sleep(ev.dur)
        fleet.stop_dup()
    elif ev.kind == "brokerrestart":
        if site is None:
            raise RuntimeError("brokerrestart needs a Site (--spawn)")
        await loop.run_in_executor(None, site.restart_broker, ev.dur)
    elif ev.kind == "gwkill":
        if site is None:
            raise RuntimeError("gwkill needs a Site (--spawn)")
        site.kill_gateway()
        await asyncio.sleep(ev.dur)
        site.start_gateway()
    elif ev.kind == "gwflap":
        if site is None:
            raise RuntimeError("gwflap needs a Site (--spawn)")
        n = int(ev.arg or 10)
        rng = fleet.rng
        t_end = time.monotonic() + ev.dur
        for i in range(n):
            site.kill_gateway()
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # quick restarts: 0-0.5 s
            site.start_gateway()
            # every third kill hits the next start-up (imports, restore, connect); the others
            # come 0.1-1 s after it runs (connected, online state published)
            if i % 3 == 0:
                await asyncio.sleep(rng.uniform(0.05, 0.6))
            else:
                await loop.run_in_executor(None, site.wait_started, max(2.0, t_end - time.monotonic()))
                await asyncio.sleep(rng.uniform(0.1, 1.0))
    elif ev.kind == "forgeack":
        seed = fleet.rng.randrange(1 << 30)
        f = await loop.run_in_executor(None, lambda: AckForger(fleet.port, "edgeflow", seed=seed, broker=fleet.broker))
        try:
            await asyncio.sleep(ev.dur)
        finally:
            await loop.run_in_executor(None, f.stop)
        fleet.forger_counts = (f.forged, f.replayed)
        fleet.truth.event("forgeack", "%d forged, %d replayed" % (f.forged, f.replayed))
    elif ev.kind == "gwstate":
        n = int(ev.arg or 10)
        await loop.run_in_executor(None, flip_gateway_state, fleet.port, "edgeflow", n, ev.dur, fleet.broker)


def flip_gateway_state(port, prefix, n, dur, broker=None):
    """Publish the retained gateway state offline then online, n times within dur seconds
    (ends online: the real gateway is up). With a secure broker as a trusted service user
    (only the gateway may publish the state): a flapping gateway connection, or a forgery."""
    import paho.mqtt.client as paho
    topics = wire.Topics(prefix)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="gwstate-flipper-%d" % os.getpid())
    host = "127.0.0.1"
    if broker is not None and not broker.insecure:
        host, port = broker.paho(c, broker.service("edgeflow-test-flipper"))
    c.connect(host, port, 10)
    c.loop_start()
    try:
        step = dur / max(1, 2 * n)
        for _ in range(n):
            for on in (False, True):
                c.publish(topics.gw_state, wire.encode_state(on, True), 1, True).wait_for_publish(5)
                time.sleep(step)
    finally:
        c.loop_stop()
        c.disconnect()


async def run_scenario(fleet, events, site=None, log=None):
    t0 = time.monotonic()
    tasks = []
    for ev in events:
        d = ev.at - (time.monotonic() - t0)
        if d > 0:
            await asyncio.sleep(d)
        tasks.append(asyncio.ensure_future(run_event(ev, fleet, site, log)))
    if tasks:
        await asyncio.gather(*tasks)


# ====================================================================== CLI


def _broker_arg(s):
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def build_parser():
    p = argparse.ArgumentParser(prog="edgeflow-fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=_version_line("edgeflow-fleet"))
    p.add_argument("--broker", type=_broker_arg, help="host:port of a running broker (and gateway)")
    p.add_argument("--spawn", action="store_true", help="start a mosquitto and a gateway in --dir")
    p.add_argument("--fleet-dir", help="with --broker: the edgeflow-provision folder of that broker's fleet "
                   "(missing devices are added: copy broker/passwd and reload the broker)")
    p.add_argument("--insecure", action="store_true", help="with --broker: devices without TLS or credentials")
    p.add_argument("--dir", default=None, help="work dir for --spawn (default ./var/fleet-<time>)")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--duration", type=float, default=30, help="seconds of sampling before the drain")
    p.add_argument("--sample-ms", type=int, default=250)
    p.add_argument("--window-ms", type=int, default=10000, help="device and gateway window size")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", default="", help="scripted faults, see the module doc")
    p.add_argument("--random-faults", type=int, default=0, help="K random faults (seeded)")
    p.add_argument("--skew-devices", type=int, default=0)
    p.add_argument("--skew-ms", type=int, default=1500)
    p.add_argument("--unsynced-devices", type=int, default=0)
    p.add_argument("--truth", default=None, help="truth SQLite file (default <dir>/truth.db)")
    p.add_argument("--drain-timeout", type=float, default=120)
    p.add_argument("--no-check", action="store_true", help="with --spawn: skip the ground-truth check")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.spawn and not args.broker:
        print("edgeflow-fleet: give --broker host:port or --spawn", file=sys.stderr)
        return 2
    if args.broker and not args.spawn and not (args.fleet_dir or args.insecure):
        print("edgeflow-fleet: with --broker give --fleet-dir FLEET (edgeflow-provision) or --insecure",
              file=sys.stderr)
        return 2
    d = args.dir or os.path.join("var", "fleet-%s" % time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(d, exist_ok=True)
    truth = args.truth or os.path.join(d, "truth.db")
    site = None
    rc = 0
    t_cpu0 = time.process_time()
    exit_on_sigterm()  # SIGTERM: the finally below stops the gateway and mosquitto we started
    try:
        if args.spawn:
            site = Site(d, window_ms=args.window_ms)
            site.start_broker()
            site.start_gateway()
            host, port = "127.0.0.1", site.port
            secrets_from = site.mq
        else:
            host, port = args.broker
            secrets_from = None
            if args.fleet_dir:
                from tools.provision import Fleet as Provisioned
                secrets_from = Provisioned(args.fleet_dir)
        events = parse_faults(args.faults)
        rng = random.Random(args.seed)
        events += random_faults(args.random_faults, args.duration, rng, site is not None)
        events.sort(key=lambda e: e.at)
        stats = asyncio.run(_main(args, host, port, truth, events, site, secrets_from))
        cpu = time.process_time() - t_cpu0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("fleet: %d devices, %.0f s, process CPU %.1f s (%.0f%% of one core), peak RSS %.1f MB"
              % (args.devices, stats["wall"], cpu, 100 * cpu / stats["wall"], rss / 1024.0))
        print("fleet: %s" % json.dumps(stats["final"]))
        if site is not None:
            site._note_peak()
            print("site: gateway CPU %.1f s, peak RSS %.1f MB; broker CPU %.1f s, peak RSS %.1f MB" % (
                proc_cpu_s(site.gateway.pid) or 0, site.peak["gateway_kb"] / 1024.0,
                proc_cpu_s(site.broker.pid) or 0, site.peak["broker_kb"] / 1024.0))
            site.stop_gateway()
            if not args.no_check:
                from tools import groundtruth
                rep = groundtruth.check(site.db, [truth], site.windows)
                print(rep.text())
                rc = 0 if rep.ok else 1
            print("fleet: database %s, truth %s" % (site.db, truth))
    finally:
        if site is not None:
            site.close()
    return rc


async def _main(args, host, port, truth, events, site, secrets_from=None):
    fleet = Fleet(args.devices, port, truth, args.seed, args.sample_ms, args.window_ms,
                  skew_devices=args.skew_devices, skew_ms=args.skew_ms, unsynced_devices=args.unsynced_devices,
                  host=host, broker=secrets_from)
    if site is not None:
        fleet.truth.meta("windows", site.windows)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    await fleet.start()

    async def progress():
        while True:
            await asyncio.sleep(5)
            s = fleet.stats()
            print("t=%5.0fs online %d/%d stored %d sent %d unacked %d" % (
                time.monotonic() - t0, s["online"], s["devices"], s["stored"], s["sent"], s["unacked"]), flush=True)
    pt = asyncio.ensure_future(progress())
    try:
        sc = asyncio.ensure_future(run_scenario(fleet, events, site, log=print))
        await asyncio.sleep(args.duration)
        await sc
        run_cpu = time.process_time() - cpu0
        run_wall = time.monotonic() - t0
        print("fleet: run phase %.0f s: process CPU %.1f s (%.0f%% of one core), RSS %.1f MB, %d records stored"
              % (run_wall, run_cpu, 100 * run_cpu / run_wall,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, fleet.truth.count), flush=True)
        drained = await fleet.quiesce(args.drain_timeout)
        print("fleet: drained=%s" % drained)
    finally:
        pt.cancel()
        final = fleet.stats()
        await fleet.shutdown()
        fleet.truth.close()
    return {"wall": time.monotonic() - t0, "final": final}



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
