"""The gateway service: the data path, top to bottom.

  MQTT (ingest.py, bounded queue)
    -> _handle: topic -> data / hello / state
    -> decode (shared.wire; a fast path for reading batches) -> bad input to quarantine
    -> dedup.py (device, boot, seq)        duplicates counted, never processed twice
    -> time checks, unsynced records       quarantine / table unsynced
    -> windows.py (device and group windows, late side output)
    -> watermark.py (device and global watermarks fire windows)
    -> checkpoint: one SQLite transaction (store.py) with outputs + state
    -> after the commit: PUBACKs to the broker, acks with credits (admission.py) to devices

Threading: one asyncio loop runs everything; the MQTT client is an asyncio
Protocol (mqttc.py, no network thread) and the store runs the commits in its own database thread (store.Database) while the
loop keeps processing the next batch. Error model: bad input is quarantined,
never raised; an unexpected exception while handling one message quarantines
that message as internal_error; a failed commit stops the gateway (nothing is
acked that is not committed; systemd restarts it and state is restored).
"""
import asyncio
import gc
import hashlib
import json
import logging
import os
import sys
import time

from shared import wire

from . import accel, logs, metrics, ops
from .admission import Admission
from .config import Config, ConfigError
from .datapath import MAX_UNSYNCED_MS
from .dedup import REFLASH, RETIRED, Dedup
from .devices import Registry
from .ingest import Ingest
from .keys import Keys, load_devices_file
from .sinks import SinkSet
from .store import RAW_COLS, Store, journal_entry

# compiled if built (gateway/accel.py)
Watermarks = accel.watermark.Watermarks
WindowSet = accel.windows.WindowSet
DataPath = accel.datapath.DataPath

_UNSYNCED = wire.FLAG_UNSYNCED
_CEP, _ANOMALY, _STATUS, _WINDOW, _GAP = wire.KIND_CEP, wire.KIND_ANOMALY, wire.KIND_STATUS, wire.KIND_WINDOW, wire.KIND_GAP
_ACK_FLAGS = wire.ACK_HAS_TIME


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _now_ms():
    return int(time.time() * 1000)


# The state tables are brought up to date from the state journal (store.py) at least this often,
# and after at most this many checkpoints: what they lag while the gateway runs.
STATE_FOLD_S = 1.0
STATE_FOLD_MAX = 64

# The GIL switch interval while the gateway runs (CPython's default: 5 ms). The database thread
# releases the GIL in every SQLite call and, with the loop busy, waits up to a whole interval to
# get it back, several times per commit: a commit took 3-10x its own CPU time and the loop then
# waited for it (issue 16, docs/benchmarks.md section 6). A shorter interval hands it back sooner.
SWITCH_INTERVAL_S = 0.0005

# The cyclic GC's thresholds while the gateway runs (CPython's default: 700, 10, 10). A checkpoint
# exports a few thousand rows that live until its commit: with 700 the young generation was
# collected several times per checkpoint and the whole heap about once a second (each full pass
# walks every live object: the devices' state, and whatever else the process holds), about a
# tenth of the CPU (issue 16, docs/benchmarks.md section 6). The data path makes no reference
# cycles; a larger young generation only delays collecting the few others (a few MB at most).
GC_THRESHOLD = (50000, 20, 10)
# Each checkpoint's snapshot freezes what is alive (gc.freeze(): constant time; the objects move
# to the permanent generation and reference counting still frees them), so the young collections
# walk only what was made since the last snapshot: not the rows held for the commits in flight (in
# a storm three raw-reading lists of ~700,000 values at a time, 0.5-0.9 s of collections per 7.2
# million readings, 4-5 % of the gateway's CPU) nor the devices' state. A frozen object is only
# missed by the collector if it is part of a reference cycle that became garbage after it was
# frozen: every GC_SWEEP_S the timer unfreezes everything and makes one full collection. The
# sweep walks the whole heap (0.4-0.5 s with 10,000 devices' state), so a due sweep waits for a
# timer tick that saw no message and nothing pending (a storm's drain is not stalled by it), but
# never longer than GC_SWEEP_BUSY_S: a gateway that is never idle still sweeps.
GC_SWEEP_S = 60.0
GC_SWEEP_BUSY_S = 600.0


class _Process:
    """Process-wide settings the gateways of one process share (scale-out runs several)."""
    __slots__ = ("gateways", "interval", "thresholds", "swept")

    def __init__(self):
        self.gateways = 0  # running
        self.interval, self.thresholds = 0.005, None  # as they were before the first started
        self.swept = 0.0  # time.monotonic() of the last sweep


_running = _Process()


def _gc_snapshot():
    """At a checkpoint's snapshot: what is alive now leaves the young collections (above)."""
    if gc.isenabled():
        gc.freeze()


def _gc_sweep(mono, busy=False):
    """Every GC_SWEEP_S (one for all the gateways of the process): a full collection of what
    the snapshots froze, the cycles among it included; while the caller is busy, only once
    GC_SWEEP_BUSY_S have passed. Returns True if it ran."""
    since = mono - _running.swept
    if since < GC_SWEEP_S or (busy and since < GC_SWEEP_BUSY_S):
        return False
    _running.swept = mono
    gc.unfreeze()
    if gc.isenabled():
        t0 = time.perf_counter()
        n = gc.collect()
        logs.event(logging.DEBUG, "gc_sweep", ms=round(1000 * (time.perf_counter() - t0), 1), collected=n)
    return True



def _retrieved(task):
    """Done callback: the task's exception counts as seen (no "never retrieved" log when it is
    collected, which may be in the middle of anything) where another task raises the same failure."""
    if not task.cancelled():
        task.exception()


class StartupError(RuntimeError):
    """The gateway cannot start (a port taken, ...): reported, the process exits non-zero."""


class Outputs:
    """Everything produced since the last checkpoint (rows per table). Raw readings are one
    flat list, RAW_COLS values per reading (no tuple per reading; store.py inserts it as is)."""

    __slots__ = ("readings", "reading_spans", "unsynced", "device_windows", "cep_events", "anomalies",
                 "device_status", "gaps", "late", "quarantine", "mids", "touched", "records", "rx", "recheck")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, [])
        self.touched = set()  # (device, boot) to ack after the commit
        self.records = 0
        self.recheck = 0  # over(): records at which to count the rows held again

    def over(self, ahead):
        """ahead = (messages, records): as many messages pending, or records that are rows held
        here (not a reading without raw retention: a window aggregate; the bound is for memory,
        so without raw readings commits grow to the messages bound, fewer and larger)."""
        if len(self.mids) >= ahead[0]:
            return True
        if self.records < self.recheck:
            return False
        h = self.held()
        if h >= ahead[1]:
            return True
        # no need to count again before records could have made the rows up to the bound (a
        # record makes a few rows at most: a raw reading, a late row, its message's span)
        self.recheck = self.records + max(1, (ahead[1] - h) // 3)
        return False

    def held(self):
        """Rows held for the next commit."""
        return (len(self.readings) // RAW_COLS + len(self.reading_spans) + len(self.unsynced) +
                len(self.device_windows) + len(self.cep_events) + len(self.anomalies) + len(self.device_status) +
                len(self.gaps) + len(self.late) + len(self.quarantine))


class Gateway(DataPath):
    """Python API: Gateway(config).run() until stop(); config is a Config, a dict of sections or None."""

    def __init__(self, config=None, ingest_factory=None, store=None):
        """ingest_factory(config, stats) -> an ingest (default: ingest.Ingest on MQTT; the
        JetStream partition ingest of gateway/ingest_jetstream.py has the same interface).
        store: a Store for cfg.store.path (default Store); the scale-out replicated checkpoint
        passes one whose commit() also replicates the delta before it returns (gateway/ckpt.py),
        so the acks that follow the commit cover replicated effects only."""
        if config is None or isinstance(config, dict):
            config = Config(config)
        self.cfg = cfg = config
        self.topics = wire.Topics(cfg.mqtt.prefix)
        self.stats = metrics.Stats()
        self.store = store or Store(cfg.store.path, cfg.store.synchronous)
        self.dedup = Dedup(cfg.dedup.window, cfg.dedup.max_boots)
        self.watermarks = Watermarks(cfg.watermark.out_of_orderness_ms, cfg.watermark.idle_timeout_ms)
        w = cfg.windows
        self.dev_windows = WindowSet("device", w.size_ms, w.offset_ms, w.allowed_lateness_ms)
        self.group_windows = WindowSet("group", w.size_ms, w.offset_ms, w.allowed_lateness_ms)
        self.groups = w.groups
        a = cfg.admission
        self.admission = Admission(a.replay_rate, a.replay_burst, a.max_replayers, a.credit_chunk,
                                   a.replay_timeout_s, _now_ms(), adaptive=a.adaptive, rate_min=a.replay_rate_min,
                                   target_s=a.latency_target_s, beta=a.backoff, increase=a.increase,
                                   first_byte_s=a.first_byte_s, growth=a.growth)
        self.devices = Registry()
        # the devices file: provisioned ids and their ack keys (None: insecure, every id taken)
        self._devices_file = cfg.devices.file  # Config applies EDGEFLOW_DEVICES_FILE
        self.keys = Keys(load_devices_file(self._devices_file) if self._devices_file else None)
        self._registry_mtime = _mtime(self._devices_file) if self._devices_file else None
        self.out = Outputs()
        self.ingest = None
        self._ingest_factory = ingest_factory or Ingest
        self.metrics_server = None
        self.metrics_registry = None
        self.retain = cfg.store.retain_readings
        self.max_future = cfg.time.max_future_ms
        self._topic_cache = {}
        lim = cfg.limits
        self.max_devices = lim.max_devices
        self.q_bytes = lim.quarantine_payload_bytes
        self.q_rows = lim.quarantine_max_rows
        self._groups_cache = {}
        self._nchan = {}  # dev -> channels per tick in its last batch (_add_run's guess)
        self._committed = {}  # dev -> {boot: committed contiguous mark}
        self._epoch = {}  # dev -> re-flashes seen in this run: acks computed before one are void
        self._ack_due = {}  # dev -> boots whose committed mark is not acked yet
        self._last_ack = {}  # dev -> processing ms of the last ack
        self._group_wm = None
        self._commit_task = None  # the last commit (done: every commit before it is done too)
        self._commit_prev = None  # the one before it while in flight (a pipelined store)
        self._snapshots = 0  # checkpoints that took self.out (checkpoint())
        self._journaled = 0  # state journal rows since the last fold (store.py)
        self._folded = time.monotonic()
        self._ack_rx = {}  # dev -> monotonic receipt of the oldest committed message its next ack covers
        self.web = None
        self._ops_task = None
        self._stop = None
        self._loop = None
        self.started = asyncio.Event()  # set once run() is connected and processing
        self.sinks = SinkSet(cfg.sinks, cfg.sinks.sink)  # downstream outbox + workers (gateway/sinks)
        self.last_error = None

    # ================================================================ lifecycle

    async def open(self):
        """Open the database and restore the checkpointed state (run() does this first)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.store.open()
        self.channels = ops.channel_map(self.cfg, self.keys.devices)
        await self.store.prepare(self.channels, self.cfg.store.index_readings)
        await self._restore()
        await self.sinks.open(self.store.db)

    async def run(self):
        # process-wide: several gateways of one process (scale-out partitions) share it, so the
        # first to start sets it and the last to stop restores it
        p = _running
        if not p.gateways:
            p.interval = sys.getswitchinterval()
            sys.setswitchinterval(min(p.interval, SWITCH_INTERVAL_S))
            p.thresholds = gc.get_threshold()
            if 0 < p.thresholds[0] < GC_THRESHOLD[0]:  # 0: the process turned collection off
                gc.set_threshold(*GC_THRESHOLD)
            p.swept = time.monotonic()
        p.gateways += 1
        try:
            await self._run()
        finally:
            p.gateways -= 1
            if not p.gateways:
                sys.setswitchinterval(p.interval)
                gc.set_threshold(*p.thresholds)
                gc.unfreeze()  # the process's collector as it was

    async def _run(self):
        try:
            await self.open()
            try:
                self.metrics_server = metrics.serve(self, self.cfg.metrics.host, self.cfg.metrics.port)
            except OSError as e:
                raise StartupError("metrics endpoint %s:%d: %s" % (self.cfg.metrics.host, self.cfg.metrics.port,
                                                                    e.strerror or e)) from e
            self.ingest = self._ingest_factory(self.cfg, self.stats)
            await self.ingest.start()
        except BaseException:
            # a start-up failure must end the process: nothing left running (the database thread)
            if self.ingest is not None:
                await self.ingest.stop(offline=False)
            await self.store.close()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            raise
        tasks = [asyncio.create_task(self._process_loop(), name="process"),
                 asyncio.create_task(self._timer_loop(), name="timer")]
        self.web = await ops.start_web(self)  # live web view; a failure is logged, data keeps flowing
        self._ops_task = asyncio.create_task(ops.ops_loop(self), name="ops")  # retention, watchdog
        stop = asyncio.create_task(self._stop.wait())
        logs.info("gateway_started", db=self.cfg.store.path, broker="%s:%d" % (self.cfg.mqtt.host, self.cfg.mqtt.port),
                  devices=len(self.devices.devs), metrics_port=self.cfg.metrics.port, accel=accel.summary())
        self.sinks.start()
        self.started.set()
        failed = None
        try:
            done, _ = await asyncio.wait(tasks + [stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    failed = t.exception()
        finally:
            self.ingest.pause()
            await ops.stop(self)
            for t in tasks + [stop]:
                t.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
            if failed is None:
                try:
                    await self.checkpoint(fold=True)  # a replica gets the fold too (not only close())
                    if self._commit_task:
                        await self._commit_task
                except Exception as e:  # noqa: BLE001 - reported below
                    failed = e
            await self.ingest.stop(offline=True)
            await self.sinks.stop()
            await self.store.close()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            logs.info("gateway_stopped", error=repr(failed) if failed else "")
        if failed is not None:
            self.last_error = failed
            raise failed

    def stop(self):
        """Ask run() to finish (final checkpoint, offline state). Safe from any thread."""
        if self.ingest is not None:
            self.ingest.closing = True  # also ends a connect loop waiting for a broker
        if self._loop is None or self._stop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._stop.set()
        else:
            self._loop.call_soon_threadsafe(self._stop.set)

    def queue_depth(self):
        return len(self.ingest.queue) if self.ingest else 0

    async def _restore(self):
        st = await self.store.load_state()
        now = _now_ms()
        self.dedup.restore(st["dedup"], st["dedup_devices"])
        self.dedup.restore_ids(st.get("device_identity", ()))
        gwm = st["meta"].get("global_watermark")
        self.watermarks.restore(st["watermarks"], gwm, now)
        self._group_wm = self.watermarks.global_wm
        self.devices.restore(st["devices"])
        dev_rows, grp_rows = [], []
        for r in st["open_windows"]:
            (dev_rows if r[0] == "device" else grp_rows).append(r[1:])
        self.dev_windows.restore(dev_rows)
        self.group_windows.restore(grp_rows)
        for d in self.devices.devs.values():
            if d.hello_boot >= 0:
                self._committed[d.dev] = {d.hello_boot: self.dedup.hwm(d.dev, d.hello_boot)}
        if st["devices"]:
            logs.info("state_restored", devices=len(st["devices"]), open_windows=len(st["open_windows"]),
                      global_watermark=gwm)

    # ================================================================ processing loop

    async def _process_loop(self):
        q = self.ingest.queue
        wake = self.ingest.wake
        ck = self.cfg.checkpoint
        max_msgs, max_recs = ck.max_messages, ck.max_records
        ahead_msgs, ahead_recs = max(ck.ahead_messages, max_msgs), 2 * max_recs
        handle = self._handle
        while True:
            if not q:
                wake.clear()
                await wake.wait()
                continue
            now = _now_ms()
            n = min(len(q), 512)
            for _ in range(n):
                topic, payload, mid, qos, rx = q.popleft()
                try:
                    handle(topic, payload, now)
                except Exception as e:  # noqa: BLE001 - input must never stop the gateway
                    logging.getLogger("edgeflow.gateway").exception("message_failed")
                    self._quarantine(topic, None, "internal_error", repr(e), payload, now)
                out = self.out
                out.mids.append((mid, qos))
                out.rx.append(rx)
                if len(out.mids) >= max_msgs or out.records >= max_recs:
                    # While a commit runs keep processing, up to ahead_messages or rows for twice
                    # max_records: then the next commit takes all of it, queued behind the one in
                    # flight (checkpoint()); otherwise the next checkpoint starts as soon as that
                    # one finishes. Group commit: the longer commits take, the larger they get
                    # and the fewer times a device's state is journaled per message.
                    if out.over((ahead_msgs, ahead_recs)):
                        await self.checkpoint(ahead=(ahead_msgs, ahead_recs))
                    elif self._commit_task is None or self._commit_task.done():
                        await self.checkpoint()
            self.stats.messages += n
            self.ingest.maybe_resume()
            await asyncio.sleep(0)

    async def _timer_loop(self):
        interval = self.cfg.checkpoint.interval_ms
        tick = min(interval, 50) / 1000.0
        last = _now_ms()
        ckpt = None
        seen_before = -1  # messages processed at the last tick: busy unless it stayed put
        while True:
            await asyncio.sleep(tick)
            if ckpt is not None and ckpt.done():
                ckpt.result()  # a failed checkpoint ends the gateway, as when it was awaited here
                ckpt = None
            now = _now_ms()
            self.watermarks.tick(now)
            self._advance_groups()
            paused = self._replay_paused()
            adm = self.admission
            dec = adm.decreases
            adm.tick_all(now, lambda dev: self._send_grant(dev, now), paused)
            if adm.decreases != dec:  # the adaptive replay rate backed off: congestion
                logs.warning("replay_rate_backoff", rate=round(adm.rate * 1000), committed_per_s=round(adm.throughput),
                             outstanding=adm.outstanding, expected_wait_s=round(adm.delay_ms / 1000, 2),
                             queue_full=paused)
            self._flush_acks(now)
            seen = self.stats.messages
            _gc_sweep(time.monotonic(), seen != seen_before or self.queue_depth() > 0 or bool(self.out.mids))
            seen_before = seen
            if now - last >= interval and ckpt is None:
                last = now
                # not awaited: it waits for the commit in flight, and admission ticks and acks
                # must not (a storm drained at 4 ticks/s with 200-300 ms commits, tokens unused)
                ckpt = asyncio.ensure_future(self.checkpoint())

    def _handle(self, topic, payload, now):
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            try:
                dev, leaf = self.topics.parse(topic)
            except wire.WireError as e:
                self._quarantine(topic, None, e.reason, e.detail, payload, now)
                return
            if not self.keys.known(dev) and not self._reload_registry(dev, now):
                self._quarantine(topic, dev, "unprovisioned", leaf, payload, now)
                return
            if dev not in self.devices.devs and len(self.devices.devs) >= self.max_devices:
                # no state for yet another id: refused, counted, stored (bounded), never cached
                self._quarantine(topic, None, "too_many_devices", "%s: limit %d" % (dev, self.max_devices),
                                 payload, now)
                return
            if len(self._topic_cache) > 4 * self.max_devices:  # only known devices' topics
                self._topic_cache.clear()
            parsed = self._topic_cache[topic] = (dev, leaf, dev.encode())
        dev, leaf, devb = parsed
        if leaf == "data":
            self._on_data(topic, dev, devb, payload, now)
        elif leaf == "hello":
            self._on_hello(topic, dev, payload, now)
        elif leaf == "state":
            self._on_state(topic, dev, payload, now)
        else:
            self._quarantine(topic, dev, "unexpected_topic", leaf, payload, now)

    def _reload_registry(self, dev, now):
        """An unknown id: reread the devices file if it changed (a device added by
        edgeflow-provision while running; one stat per unknown message). True if dev is known now."""
        path = self._devices_file
        m = _mtime(path)
        if m is None or m == self._registry_mtime:
            return False
        try:
            devices = load_devices_file(path)
        except ConfigError as e:
            logs.error("devices_file_invalid", error=str(e))
            return False
        self.keys, self._registry_mtime = Keys(devices), m
        self._topic_cache.clear()  # a revoked id is refused from now on
        logs.info("devices_file_reloaded", devices=len(devices))
        return dev in devices

    # ================================================================ data

    def _records(self, topic, dev, boot, recs, now):
        """Window summaries, CEP events, anomalies, status and gap records."""
        d = self.devices.touch(dev)
        d.last_seen = now
        out = self.out
        out.touched.add((dev, boot))
        dd = self.dedup
        st = self.stats
        maxt = None
        for kind, seq, t, fl, body in recs:
            c = dd.peek(dev, boot, seq) if kind == _GAP else dd.mark(dev, boot, seq)
            if not self._fresh(d, dev, boot, seq, c, now):
                continue
            if kind == _GAP:
                if not self._gap(dev, boot, seq, t, body, d):
                    d.deferred += 1
                    st.deferred += 1
                    continue
                dd.mark(dev, boot, seq)
            d.received += 1
            out.records += 1
            st.records += 1
            self._count_live(d, dev, boot, seq, seq, 1, now)
            if kind == _GAP:
                continue
            synced = not fl & _UNSYNCED
            if synced:
                why = wire.check_event_time(t, now, self.max_future)
                if why:
                    self._quarantine(topic, dev, why, "%s t=%d" % (wire.KIND_NAMES[kind], t), None, now, boot, seq)
                    continue
                if maxt is None or t > maxt:
                    maxt = t
                    self._observe(dev, t, self.watermarks.device_wm(dev), now)  # per record, like readings
            elif not 0 <= t <= MAX_UNSYNCED_MS:
                self._quarantine(topic, dev, "bad_unsynced_time", "%s t=%d" % (wire.KIND_NAMES[kind], t), None, now,
                                 boot, seq)
                continue
            else:
                d.unsynced += 1
                st.unsynced += 1
            if kind == _WINDOW:
                out.device_windows.append((dev, boot, seq, t, fl) + tuple(body))
            elif kind == _CEP:
                rule, sev, span, ev = body
                out.cep_events.append((dev, boot, seq, t, fl, rule, sev, span, json.dumps(list(ev))))
                st.alerts += 1
            elif kind == _ANOMALY:
                out.anomalies.append((dev, boot, seq, t, fl) + tuple(body))
                st.alerts += 1
            elif kind == _STATUS:
                out.device_status.append((dev, boot, seq, t, fl) + tuple(body))
                d.status = (t,) + tuple(body)
                self.devices.get(dev)  # a status changes the whole row

    def _gap(self, dev, boot, seq, t, body, d):
        """Apply a gap record; False if a range lies beyond the dedup window (resent later).
        Ranges applied before that stay applied: they are true and idempotent."""
        gboot, ranges = body
        rows = []
        for first, length in ranges:
            newly = self.dedup.mark_range(dev, gboot, first, length)
            if newly is None:
                return False
            rows.append((dev, boot, seq, t, gboot, first, length, newly))
            d.dropped_by_device += newly
            self.stats.dropped_by_device += newly
            if gboot != boot:
                self.out.touched.add((dev, gboot))
        self.out.gaps.extend(rows)
        return True

    # ================================================================ control

    def _on_hello(self, topic, dev, payload, now):
        """The hello contract (docs/wire.md): authenticate, classify the instance id, then
        account everything below the device's floor and admit its backlog."""
        try:
            h = wire.decode_hello(payload)
        except wire.WireError as e:
            self._quarantine(topic, dev, e.reason, e.detail, payload, now)
            return
        if h["device_id"] != dev:
            self._quarantine(topic, dev, "spoofed_device_id", "payload says %r" % h["device_id"], payload, now)
            return
        if self.keys.enabled:
            k = self.keys.hmac(dev)
            if k is None:
                self._quarantine(topic, dev, "unprovisioned", "no ack_key for this device", payload, now)
                return
            if not wire.hello_mac_ok(payload, k):
                self._quarantine(topic, dev, "bad_mac", "hello", payload, now)
                return
        if h["nonce"] == 0:
            self._quarantine(topic, dev, "bad_nonce", "0", payload, now)
            return
        dd = self.dedup
        d = self.devices.get(dev)
        inst = dd.incarnation(dev, h["instance"])
        if inst == RETIRED:
            self._quarantine(topic, dev, "retired_instance", "%08x was re-flashed away" % h["instance"], payload, now)
            return
        if inst == REFLASH:
            # flash erased: the old boots cannot come back, the boot counter restarted
            logs.warning("device_reflashed", device=dev, instance="%08x" % h["instance"], boot=h["boot"],
                         old_boot=d.hello_boot, reflashes=dd.devs[dev].reflashes)
            self._committed.pop(dev, None)
            self._ack_due.pop(dev, None)
            self._epoch[dev] = self._epoch.get(dev, 0) + 1
            d.hello_boot, d.hello_next_seq = -1, 0
        elif (h["boot"], h["next_seq"]) < (d.hello_boot, d.hello_next_seq):
            # an older hello of this instance (replayed, or redelivered late): its nonce is dead
            self._quarantine(topic, dev, "stale_hello", "(%d, %d) after (%d, %d)" % (
                h["boot"], h["next_seq"], d.hello_boot, d.hello_next_seq), payload, now)
            return
        self.stats.hellos += 1
        dd.set_nonce(dev, h["nonce"])
        d.fw = h["fw"]
        d.hello_boot, d.hello_next_seq, d.backlog = h["boot"], h["next_seq"], h["backlog"]
        d.oldest_boot, d.oldest_seq = h["floor_boot"], h["floor_seq"]
        d.last_hello = d.last_seen = now
        d.online = 1
        # The device will never send anything below its floor again (docs/wire.md).
        floor_boot, floor_seq = h["floor_boot"], h["floor_seq"]
        skipped = dd.hello(dev, floor_boot, floor_seq)
        if skipped:
            d.skipped_by_hello += skipped
            self.stats.skipped_by_hello += skipped
        self.admission.hello(dev, h["backlog"], now)
        self.watermarks.set_online(dev, True)
        self.out.touched.add((dev, h["boot"]))
        if floor_boot != h["boot"]:
            self.out.touched.add((dev, floor_boot))

    def _on_state(self, topic, dev, payload, now):
        try:
            online = wire.decode_state(payload)
        except wire.WireError as e:
            self._quarantine(topic, dev, e.reason, e.detail, payload, now)
            return
        d = self.devices.get(dev)
        d.online = 1 if online else 0
        self.watermarks.set_online(dev, online)
        if not online:
            self.stats.offline_wills += 1
            self.admission.leave(dev)
            self._advance_groups()

    def _quarantine(self, topic, dev, reason, detail, payload, now, boot=None, seq=None):
        """Bad input: a row with the reason, a counter, never an exception."""
        if isinstance(topic, (bytes, bytearray)):
            topic = bytes(topic).decode("utf-8", "replace")
        digest = None
        if payload is not None:
            # a redelivered bad message (crash before its PUBACK) must not make a second row
            digest = hashlib.sha1(topic.encode() + b"\0" + payload).digest()[:16]
            if len(payload) > self.q_bytes:  # the row keeps a bounded prefix
                detail = "%s [%d bytes, first %d kept]" % (detail, len(payload), self.q_bytes)
            payload = bytes(payload[:self.q_bytes])
        self.out.quarantine.append((now, topic[:256], dev, boot, seq, reason, detail[:512], payload, digest))
        self.out.records += 1
        self.stats.quarantine(reason)
        if dev is not None:
            self.devices.touch(dev).quarantined += 1

    # ================================================================ checkpoint and acks

    async def checkpoint(self, fold=False, ahead=None):
        """Commit everything since the last checkpoint; acks follow the commit.

        The snapshot is taken synchronously, so processing continues while the
        transaction runs in the database thread. One commit is in flight, or two for the
        processing loop (ahead) on a pipelined store: then the next one queues behind the one
        in flight (the database thread runs them in order, none after one failed) and the
        database thread goes from one to the next instead of idling until the loop notices
        the first is done and snapshots (issue 16, docs/benchmarks.md section 6).
        fold: also bring the state tables up to date (the last checkpoint of run()).
        ahead: (messages, records) the processing loop may hold while a commit is in flight.
        A call that finds a snapshot taken since it was made (by another checkpoint while this
        one waited for a commit) returns at once, with less than `ahead` pending: what it was
        to commit is in that one. No lock: nothing is awaited between the last look at the
        commits in flight and the snapshot."""
        gen = self._snapshots
        while True:
            for t in (self._commit_prev, self._commit_task):
                if t is not None and t.done():
                    t.result()  # a failed commit stops the gateway: raised here
            if not fold and gen != self._snapshots and (ahead is None or not self.out.over(ahead)):
                return
            last = self._commit_task
            if last is None or last.done():
                break
            if ahead is not None and self.store.pipelined:
                prev = self._commit_prev
                if prev is None or prev.done():
                    break  # queued behind `last`
                await asyncio.shield(prev)
            else:
                await asyncio.shield(last)
        # the snapshot: nothing is awaited from here on
        out = self.out
        self.out = Outputs()
        _gc_snapshot()
        self._snapshots += 1
        dd_ups, dd_dels, mins = self.dedup.export()
        ids = self.dedup.export_ids()
        global_changed = self.watermarks.global_dirty
        wm_rows, gwm = self.watermarks.export()
        ow1, owd1, res1 = self.dev_windows.export()
        ow2, owd2, res2 = self.group_windows.export()
        results = res1 + res2
        dev_rows, dev_hot = self.devices.export()
        revisions = sum(1 for r in results if r[5])  # revision 0 is the first result
        self.stats.window_results += len(results) - revisions
        self.stats.window_revisions += revisions
        writes = [
            ("readings_flat", out.readings), ("reading_spans", out.reading_spans), ("unsynced", out.unsynced),
            ("device_windows", out.device_windows),
            ("cep_events", out.cep_events), ("anomalies", out.anomalies), ("device_status", out.device_status),
            ("gaps", out.gaps), ("late", out.late), ("quarantine", out.quarantine),
            ("quarantine_prune", [(self.q_rows,)] if out.quarantine else []),
            ("window_revisions", results), ("window_results", results),
        ]
        state = [  # store.JOURNALED, in the order a fold applies them
            ("devices", dev_rows), ("devices_hot", dev_hot),
            ("dedup", dd_ups), ("dedup_del", dd_dels), ("dedup_devices", list(mins.items())),
            ("device_identity", ids),
            ("device_watermarks", wm_rows),
            # the deletes as a list: marshal sorts a set (about 10x the time)
            ("windows", [(ws.scope, ups, list(dels)) for ws, ups, dels in ((self.dev_windows, ow1, owd1),
                                                                           (self.group_windows, ow2, owd2))
                         if ups or dels]),
            ("meta", [("global_watermark", gwm)] if global_changed else []),
        ]
        if self.sinks:  # downstream items commit with the results they carry
            raw = out.readings  # as rows only for sinks that forward raw readings
            rows = list(zip(*[iter(raw)] * RAW_COLS)) if raw and self.sinks.forwards("readings") else []
            writes.append(("sink_outbox", self.sinks.stage(writes + [("readings", rows)])))
        n_state = sum(len(r) for _k, r in state) + len(ow1) + len(owd1) + len(ow2) + len(owd2)
        rows = sum(len(r) for _k, r in writes) - len(out.readings) + len(out.readings) // RAW_COLS + n_state
        mono = time.monotonic()
        fold = (self._journaled or n_state) and (fold or mono - self._folded >= STATE_FOLD_S or
                                                 self._journaled >= STATE_FOLD_MAX)
        if not rows and not out.mids and not out.touched and not fold:
            return
        # the state's changes: one journal row; folded into the state tables about once a
        # second, in a checkpoint's transaction (store.py, "The state journal")
        if n_state:
            writes.append(("state_journal", [(journal_entry(state),)]))
            self._journaled += 1
        if fold:
            # open() folded the table, so it holds this run's rows only: their merge
            writes.append(("state_fold", [self._fold_rows()]))
            self._journaled, self._folded = 0, mono
            rows += 1
        # the marks acked are the ones this transaction commits
        acks = self._acks_of(out.touched)
        last = self._commit_task  # in flight still, or done
        self._commit_prev = last if last is not None and not last.done() else None
        self._commit_task = asyncio.ensure_future(self._commit(writes, rows, out.mids, acks, out.records, out.rx))
        # a failure is raised to the next checkpoint() (the processing loop's: the gateway
        # stops); a commit queued behind a failed one fails too, and nobody may look at it
        self._commit_task.add_done_callback(_retrieved)

    def _fold_rows(self):
        """store.FoldMerge.rows() of the journal rows since the last fold, without merging them:
        each key changed since then once, read from the state right after this checkpoint's
        export, which is what its last journal row holds (tests/test_gateway_state_rows.py
        checks the two folds equal)."""
        full, hot = self.devices.fold_rows()
        ups, dels, mins, ids = self.dedup.fold_rows()
        wms, gchanged = self.watermarks.fold_rows()
        ow1, owd1 = self.dev_windows.fold_rows()
        ow2, owd2 = self.group_windows.fold_rows()
        meta = [("global_watermark", self.watermarks.global_wm)] if gchanged else []
        return full, hot, [("dedup", dels, ups), ("dedup_devices", [], list(mins.items())),
                           ("device_identity", [], ids), ("device_watermarks", [], wms),
                           ("open_windows", owd1 + owd2, ow1 + ow2), ("meta", [], meta)]

    async def _commit(self, writes, rows, mids, acks, records=0, rx=()):
        t0 = time.perf_counter()
        s = self.stats
        if rows:
            try:
                await self.store.commit(writes)
            except BaseException:
                s.checkpoint_failures += 1
                raise
            self.sinks.committed(writes)
        dt = time.perf_counter() - t0
        self._observe_commit(dt, rx, acks)
        s.checkpoints += 1
        s.checkpoint_seconds += dt
        s.checkpoint_last_s = dt
        s.checkpoint_last_rows = rows
        s.quarantine_pruned = self.store.pruned[0]
        # committed: now the broker may forget the messages and devices their records
        self.admission.committed(records, _now_ms())  # T for the adaptive replay rate
        self.ingest.puback(mids)
        self._ack_committed(acks)
        self._flush_acks(_now_ms())
        ck = self.cfg.checkpoint
        if len(self.out.mids) >= ck.max_messages or self.out.records >= ck.max_records:
            # work piled up during this commit (a failure of it is the processing loop's to raise)
            asyncio.ensure_future(self.checkpoint()).add_done_callback(_retrieved)
        if dt > 1.0:
            logs.warning("slow_checkpoint", seconds=round(dt, 3), rows=rows)
        else:
            logs.event(logging.DEBUG, "checkpoint", ms=round(dt * 1000, 2), rows=rows, messages=len(mids),
                       acks=len(acks))

    def _observe_commit(self, dt, rx, acks):
        """Latency metrics (metrics.py): receipt -> commit per message, and the oldest receipt
        each device's next ack covers."""
        s = self.stats
        s.checkpoint_hist.observe(dt)
        mono = s.last_commit_mono = time.monotonic()
        if rx:
            s.commit_latency.observe_all([mono - t if t else 0.0 for t in rx])
            oldest = min(rx)
            ack_rx = self._ack_rx
            for ack in acks:
                dev = ack[0]
                if dev not in ack_rx:
                    ack_rx[dev] = oldest

    def _acks_of(self, touched):
        """[(dev, boot, committed mark, re-flash epoch)] of the (dev, boot) a checkpoint touched,
        sorted: the marks its transaction commits."""
        hwm, ep = self.dedup.hwm, self._epoch
        return sorted((dev, boot, hwm(dev, boot), ep.get(dev, 0)) for dev, boot in touched)

    def _ack_committed(self, acks):
        """The marks of a commit (_acks_of) become due to be acked."""
        ep, committed, due = self._epoch, self._committed, self._ack_due
        for dev, boot, hwm, epoch in acks:
            if epoch != ep.get(dev, 0):
                continue  # the device was re-flashed meanwhile: these marks are the old flash's
            marks = committed.get(dev)
            if marks is None:
                committed[dev] = {boot: hwm}
            else:
                marks[boot] = hwm
            b = due.get(dev)
            if b is None:
                due[dev] = {boot}
            else:
                b.add(boot)

    def _flush_acks(self, now):
        """Send the committed marks that are due. Acks are cumulative, so at most one per
        device per ack_interval_ms carries them all; credits ride on the first."""
        cut = now - self.cfg.checkpoint.ack_interval_ms  # acked after this: not yet
        paused = None
        due, last, committed, dedup = self._ack_due, self._last_ack, self._committed, self.dedup
        mono = time.monotonic()
        for dev in list(due):
            if last.get(dev, cut) > cut:
                continue
            if not dedup.nonce(dev):
                continue  # no hello yet: the device would refuse an ack without its nonce
            if paused is None:
                paused = self._replay_paused()
            boots = due.pop(dev)
            if len(boots) > 1:
                boots = sorted(boots)
            marks = committed[dev]
            credits, replay = self.admission.grant(dev, now, paused)
            for boot in boots:
                self._send_ack(dev, boot, marks[boot], now, credits, replay, mono)
                credits = 0
            last[dev] = now
            if len(marks) > 1:  # forget boots the device has retired
                mb = dedup.min_boot(dev)
                for b in [b for b in marks if b < mb and b not in boots]:
                    del marks[b]

    def _send_ack(self, dev, boot, hwm, now, credits, replay, mono=None):
        """Signed with the device's ack_key over the device id and every field, and bound to
        the nonce of its latest hello (docs/wire.md): a forged or replayed ack is useless."""
        flags = _ACK_FLAGS
        if hwm < 0:
            flags |= wire.ACK_NONE
        payload = wire.encode_ack(dev, boot, max(hwm, 0), now, credits, self.dedup.nonce(dev), self.keys.hmac(dev),
                                  replay, flags)
        self.ingest.publish(self.topics.ack(dev), payload)
        st = self.stats
        st.acks_sent += 1
        rx = self._ack_rx.pop(dev, None)
        if rx:
            st.ack_latency.observe((mono or time.monotonic()) - rx)

    def _send_grant(self, dev, now):
        """An ack that only carries credits; its (boot, seq) repeats a committed mark."""
        if not self.dedup.nonce(dev):
            return
        credits, replay = self.admission.grant(dev, now)
        if credits <= 0:
            return
        d = self.devices.devs.get(dev)
        boot = max(d.hello_boot, 0) if d else 0
        hwm = self._committed.get(dev, {}).get(boot, -1)
        self._send_ack(dev, boot, hwm, now, credits, replay)
        self._last_ack[dev] = now

    def _replay_paused(self):
        f = self.cfg.admission.pause_queue_fraction
        return self.ingest is not None and len(self.ingest.queue) > f * self.ingest.maxsize and f < 1.0
