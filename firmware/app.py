# The device application: sampling -> edge pipeline -> outbox (flash) -> uplink (MQTT).
#
#   app = App(config, hal)     config: dict or JSON text (validated by firmware.config.load)
#   await app.run()            until stop() (graceful) or kill() (power cut)
#   app.counters()             dict of counters (samples, records, sent, acked, dropped, ...)
#
# No module-level state: the fleet simulator runs many App objects in one process, each with
# its own firmware.hal_sim.SimHal. On the board, main.py calls firmware.app.main().
import asyncio
import gc
import sys

from shared import wire
from firmware import config as _config
from firmware import hal as _hal
from firmware.identity import Identity
from firmware.outbox import Outbox
from firmware.clock import Clock
from firmware.uplink import Uplink
from firmware.pipeline import Pipeline

FW_VERSION = "0.1.0"
_MP = sys.implementation.name == "micropython"
_REBASE_MS = 1 << 28  # rebase the pipeline's relative time well before small ints overflow


def _u32(v):
    if v < 0:
        return 0
    return v if v <= 0xFFFFFFFF else 0xFFFFFFFF


class App:
    def __init__(self, config, hal, fw=FW_VERSION):
        self.cfg = _config.load(config)
        self.hal = hal
        self.fw = fw
        self.running = False
        self.killed = False
        self.boot = None
        self.outbox = None
        self.clock = None
        self.uplink = None
        self.pipeline = None
        self._tasks = []
        self._pbase = 0  # boot ms at the pipeline's t_rel == 0
        self._psynced = False
        self._pepoch = None
        self.c = {"samples": 0, "missing": 0, "readings": 0, "records": 0, "windows": 0, "cep": 0,
                  "anomalies": 0, "status": 0, "refused": 0, "ntp_ok": 0, "ntp_fail": 0, "errors": 0}
        self.cep_events = []  # last CEP events (rule_id, t, body), bounded

    # ------------------------------------------------------------ boot

    def _boot(self):
        cfg = self.cfg
        hal = self.hal
        fs = hal.fs
        self.identity = Identity(fs)
        self.boot = self.identity.boot
        ob = cfg["outbox"]
        self.outbox = Outbox(fs, self.boot, ob["dir"], ob["max_bytes"], ob["segment_bytes"], ob["batch_records"],
                             ob["batch_ms"], ob["ack_persist_ms"]).load()
        c = cfg["clock"]
        self.clock = Clock(hal, self.boot, c["max_step_ms"], c["use_beacon"])
        self.outbox.stamp = self.clock.stamp_now
        self.pipeline = self._make_pipeline()
        self._pbase = self.clock.boot_ms()
        self._sync_pipeline()
        self.uplink = Uplink(cfg, hal, self.outbox, self.clock, self.fw)
        hal.console("edgeflow boot device=%s boot=%d fw=%s" % (cfg["device_id"], self.boot, self.fw))
        if self.outbox.torn:
            hal.console("outbox: %d torn segment tail(s) skipped" % self.outbox.torn)

    def _make_pipeline(self):
        return Pipeline(self.cfg, self._emit)

    def _sync_pipeline(self):
        """Give the pipeline its base: epoch ms at t_rel 0 when synced, else boot ms."""
        ck = self.clock
        if ck.synced:
            self._psynced = True
            self._pepoch = ck.boot_epoch
            self.pipeline.set_base(ck.boot_epoch + self._pbase, True)
        else:
            self._psynced = False
            self.pipeline.set_base(self._pbase, False)

    def _emit(self, kind, t, flags, body):
        """Pipeline output (window / cep / anomaly records) -> outbox."""
        seq = self.outbox.append(kind, t, flags, body, self.clock.boot_ms())
        if seq is None:
            self.c["refused"] += 1
            return
        self.c["records"] += 1
        if kind == wire.KIND_CEP:
            self.c["cep"] += 1
            self.hal.console("CEP %s severity=%d span_ms=%d t=%d seq=%d evidence=%s"
                             % (body[0], body[1], body[2], t, seq, list(body[3])))
            self.cep_events.append((body[0], t, body))
            if len(self.cep_events) > 32:
                self.cep_events.pop(0)
        elif kind == wire.KIND_ANOMALY:
            self.c["anomalies"] += 1
            self.hal.console("ANOMALY ch=%d detector=%d score=%d value=%d" % (body[0], body[1], body[2], body[3]))
        elif kind == wire.KIND_WINDOW:
            self.c["windows"] += 1

    # ------------------------------------------------------------ tasks

    async def _sampler(self):
        cfg = self.cfg
        hal = self.hal
        ck = self.clock
        ob = self.outbox
        chans = [(_hal.CHANNELS[nm], num) for nm, num in _config.channel_map(cfg)]  # (HAL id, wire channel)
        period = cfg["sample_ms"]
        raw = cfg["raw"]["send"]
        every = cfg["raw"]["every"]
        n = 0
        nxt = ck.boot_ms()
        while self.running:
            b = ck.boot_ms()
            t_rel = b - self._pbase
            if t_rel >= _REBASE_MS:
                self._pbase = b
                base = (self._pepoch + b) if self._psynced else b
                self.pipeline.rebase(base)
                t_rel = 0
            keep = raw and n % every == 0
            for hc, ch in chans:
                v = hal.read(hc)
                if v is None:
                    self.c["missing"] += 1
                    continue
                self.pipeline.sample(ch, v, t_rel)
                if keep:
                    t, fl = ck.stamp_now()
                    if ob.reading(ch, t, fl, v, b) is None:
                        self.c["refused"] += 1
                    else:
                        self.c["readings"] += 1
            self.pipeline.tick(t_rel)
            self.c["samples"] += 1
            n += 1
            nxt += period
            d = nxt - ck.boot_ms()
            if d < 0:
                nxt = ck.boot_ms()  # fell behind: skip, never burst
                d = 0
            await hal.sleep_ms(d)

    async def _store(self):
        ob = self.outbox
        ck = self.clock
        while self.running:
            before = ob.flushes
            try:
                ob.tick(ck.boot_ms())
            except OSError as e:
                self.c["errors"] += 1
                self.hal.console("outbox error %r" % (e,))
            if ob.flushes != before or ob.need_rewind:
                self.uplink.wake.set()
            await self.hal.sleep_ms(100)

    def status_body(self):
        ob = self.outbox
        return (_u32(self.clock.boot_ms() // 1000), _u32(ob.stored_records()), _u32(ob.total_bytes()),
                _u32(ob.dropped + ob.refused), _u32(getattr(self.pipeline, "late", 0)),
                self.clock.offset_ms, _u32(self.hal.mem_free()), _u32(self.uplink.c["reconnects"]))

    async def _housekeeping(self):
        hal = self.hal
        cfg = self.cfg
        ck = self.clock
        wdt = cfg["watchdog_ms"]
        if wdt:
            hal.wdt_start(wdt)
        status_ms = cfg["status_every_s"] * 1000
        ntp_ms = cfg["clock"]["ntp_every_s"] * 1000
        last_status = ck.boot_ms()
        last_ntp = None
        last_gc = 0
        steps = -1
        while self.running:
            hal.wdt_feed()
            b = ck.boot_ms()
            # time: NTP when reachable (retry every minute until the first answer)
            if ntp_ms and hal.wifi_connected() and (last_ntp is None or b - last_ntp >= (ntp_ms if ck.source == "ntp" else 60000)):
                last_ntp = b
                b0 = ck.boot_ms()
                e = None
                try:
                    e = hal.ntp(cfg["clock"]["ntp_host"])
                except Exception:
                    e = None
                if e is None:
                    self.c["ntp_fail"] += 1
                else:
                    self.c["ntp_ok"] += 1
                    ck.set_time(e, "ntp", (b0 + ck.boot_ms()) // 2)
            if ck.steps != steps or (ck.synced and not self._psynced):
                steps = ck.steps
                if ck.synced and (not self._psynced or self._pepoch != ck.boot_epoch):
                    self._sync_pipeline()
            if status_ms and b - last_status >= status_ms:
                last_status = b
                t, fl = ck.stamp_now()
                if self.outbox.append(wire.KIND_STATUS, t, fl, self.status_body(), b) is not None:
                    self.c["status"] += 1
            if _MP and b - last_gc >= 5000:
                last_gc = b
                gc.collect()
            hal.led(self.uplink.session)
            await hal.sleep_ms(1000)

    # ------------------------------------------------------------ lifecycle

    async def run(self):
        if self.boot is None:
            self._boot()
        self.running = True
        up = self.uplink
        self._tasks = [asyncio.create_task(self._sampler()), asyncio.create_task(self._store()),
                       asyncio.create_task(up.run()), asyncio.create_task(self._housekeeping())]
        try:
            while self.running:
                for t in self._tasks:
                    if t.done() if hasattr(t, "done") else False:
                        self.running = False
                await _hal.sleep_ms(100)
        finally:
            for t in self._tasks:
                try:
                    t.cancel()
                except Exception:
                    pass
            self._tasks = []
            if not self.killed:
                try:
                    self.pipeline.flush(self.clock.boot_ms() - self._pbase)
                    self.outbox.flush()
                    self.outbox.persist_acks()
                except Exception as e:
                    self.hal.console("shutdown flush failed %r" % (e,))
                await up.shutdown()
            else:
                up.kill()

    def stop(self):
        """Graceful stop (like a soft reset): flush the outbox, announce offline, disconnect."""
        self.running = False
        if self.uplink is not None:
            self.uplink.running = False

    def kill(self):
        """Power cut: stop now. Nothing more reaches flash (the RAM batch is lost), the broker
        publishes the last will. Reboot with hal.reboot() and a new App on the same hal."""
        self.killed = True
        self.running = False
        for t in self._tasks:
            try:
                t.cancel()
            except Exception:
                pass
        if self.uplink is not None:
            self.uplink.kill()

    def counters(self):
        out = {}
        for k in self.c:
            out[k] = self.c[k]
        if self.uplink is not None:
            for k in self.uplink.c:
                out[k] = self.uplink.c[k]
            out["connected"] = self.uplink.session
            out["gw_online"] = self.uplink.gw_online
        if self.outbox is not None:
            ob = self.outbox
            out["boot"] = self.boot
            out["next_seq"] = ob.seq
            out["stored"] = ob.stored_records()
            out["outbox_bytes"] = ob.total_bytes()
            out["unacked"] = ob.unacked()
            out["dropped"] = ob.dropped
            out["outbox_refused"] = ob.refused
            out["flushes"] = ob.flushes
            out["torn"] = ob.torn
        if self.clock is not None:
            out["synced"] = self.clock.synced
            out["clock_offset_ms"] = self.clock.offset_ms
        return out


# ---------------------------------------------------------------- on the board


def main(config_path="config.json"):
    """Board entry point (main.py): validate config.json, build the ESP32 HAL, run."""
    try:
        with open(config_path) as f:
            text = f.read()
    except OSError as e:
        print("edgeflow: cannot read %s (%r): deploy a config with tools/deploy.py" % (config_path, e))
        return
    try:
        cfg = _config.load(text)
    except _config.ConfigError as e:
        print("edgeflow: CONFIG ERROR %s" % e)
        return
    from firmware.hal_esp32 import Esp32Hal
    hal = Esp32Hal(cfg)
    app = App(cfg, hal)
    try:
        asyncio.run(app.run())
    except KeyboardInterrupt:
        print("edgeflow: stopped")
    except Exception as e:
        print("edgeflow: fatal error, resetting")
        try:
            sys.print_exception(e)
        except AttributeError:
            pass
        hal.reset()
