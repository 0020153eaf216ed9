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

from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
from firmware import hal as _hal
# outbox, clock, uplink, pipeline, identity: imported by firmware/appboot.py (App set-up)

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

# underscore consts: no global, no qstr on the board (RAM)
_FW_VERSION = const("0.1.0")
_MP = sys.implementation.name == "micropython"
_REBASE_MS = const(1 << 28)  # rebase the pipeline's relative time well before small ints overflow
_HI = const(1 << 28)  # firmware.clock: boot ms = ms_hi * 2**28 + ms_lo


class App:
    def __init__(self, config, hal, fw=_FW_VERSION):
        from firmware.appboot import init  # boot only: build() unloads it (RAM)
        init(self, config, hal, fw)

    # ------------------------------------------------------------ boot

    def _boot(self):
        from firmware.appboot import boot
        boot(self)

    def _make_pipeline(self):
        from firmware.pipeline import Pipeline
        return Pipeline(self.cfg, self._emit)

    def _sync_pipeline(self):
        """Give the pipeline its base: epoch ms at t_rel 0 when synced, else boot ms."""
        self._x("sync_pipeline")

    def _x(self, name, *a):
        """Run firmware/appx.py's name(self, *a): rarely run App code, unloaded after (RAM)."""
        from firmware import appx
        try:
            return getattr(appx, name)(self, *a)
        finally:
            _hal.unload("firmware.appx")

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
        elif kind == wire.KIND_ANOMALY:
            self.c["anomalies"] += 1
            self.hal.console("ANOMALY ch=%d detector=%d score=%d value=%d" % (body[0], body[1], body[2], body[3]))
        elif kind == wire.KIND_WINDOW:
            self.c["windows"] += 1

    # ------------------------------------------------------------ tasks

    def sample_step(self):
        """One sampling round: each channel from the HAL -> pipeline.sample -> (every
        raw.every rounds) the raw reading into the outbox's RAM batch; then pipeline.tick.
        The per-sample path: allocates nothing on MicroPython in steady state; only a window
        close, a rule or detector firing, a batch flush and the rebase every 2**28 ms do
        (tests/logic/test_sample_path.py). Returns t_rel."""
        ck = self.clock
        ck.update()
        lo = ck.ms_lo
        t_rel = (ck.ms_hi - self._phi) * _HI + (lo - self._plo)
        if t_rel >= _REBASE_MS:
            self._x("rebase")
            t_rel = 0
        hal = self.hal
        p = self.pipeline
        ob = self.outbox
        c = self.c
        keep = self._raw and self._n == 0
        tb = ck.tb
        fl = ck.tfl
        for hc, ch in self._chans:
            try:
                v = hal.read(hc)
            except Exception:  # any driver error (DHT: a plain Exception) is a missing sample
                v = None
                c["sensor_errors"] += 1
            if v is None:
                c["missing"] += 1
                continue
            p.sample(ch, v, t_rel)
            if keep:
                if ob.reading_at(ch, v, tb, fl, lo) is None:
                    c["refused"] += 1
                else:
                    c["readings"] += 1
        p.tick(t_rel)
        c["samples"] += 1
        n = self._n + 1
        self._n = n if n < self._every else 0
        return t_rel

    async def _sampler(self):
        hal = self.hal
        ck = self.clock
        period = self.cfg["sample_ms"]
        ck.update()
        h0 = ck.ms_hi  # schedule in ms since (h0, 0): small ints, no long boot ms per round
        nxt = ck.ms_lo
        beat = self._beat
        while self.running:
            self.sample_step()
            beat["sampler"] = ck.ms_lo  # progress (small int: no heap per round)
            nxt += period
            ck.update()
            now = (ck.ms_hi - h0) * _HI + ck.ms_lo
            d = nxt - now
            if d < 0:
                nxt = now  # fell behind: skip, never burst
                d = 0
            if nxt >= _HI:
                nxt -= _HI
                h0 += 1
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
            self._beat["store"] = ck.ms_lo
            if ob.flushes != before or ob.need_rewind:
                self.uplink.wake.set()
            await self.hal.sleep_ms(100)

    async def _supervise(self, name, fn):
        """Run a task; any exception is counted, logged and the task restarted after 1 s; too
        many failures of one task within a minute reset the board (firmware/appx.py)."""
        while self.running:
            try:
                await fn()
                return  # ended normally (stop)
            except Exception as e:  # CancelledError is a BaseException: not caught
                self._x("task_failed", name, e)
                await self.hal.sleep_ms(1000)

    def progressing(self):
        """True while the sampler and the store loop made progress recently (the watchdog is fed
        only then: a hung task resets the board)."""
        lo = self.clock.ms_lo
        limit = 5000 + 3 * self.cfg["sample_ms"]
        for name in ("sampler", "store"):
            t = self._beat.get(name)
            if t is None:
                continue  # not started yet
            d = lo - t
            if d < 0:
                d += _HI
            if d > limit:
                return False
        return True

    def status_body(self):
        """The status record's body (firmware/appx.py)."""
        return self._x("status_body")

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
            if self.progressing():
                hal.wdt_feed()
            b = ck.boot_ms()
            # time: NTP when reachable (retry every minute until the first answer)
            if ntp_ms and hal.wifi_connected() and (last_ntp is None or b - last_ntp >= (ntp_ms if ck.synced else 60000)):
                # retried every minute only while the clock is unset: once NTP or the gateway's
                # beacon set it, NTP runs at its period (each query blocks <= 0.5 s, hal_esp32)
                last_ntp = b
                self._x("ntp")
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
        self._tasks = [asyncio.create_task(self._supervise("sampler", self._sampler)),
                       asyncio.create_task(self._supervise("store", self._store)),
                       asyncio.create_task(self._supervise("uplink", up.run)),
                       asyncio.create_task(self._supervise("housekeeping", self._housekeeping))]
        try:
            while self.running:
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
                    self._x("flush_all")
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
        self._x("kill")

    def counters(self):
        return self._x("counters")


# ---------------------------------------------------------------- on the board


def build(config_path="config.json"):
    """Board set-up before the event loop (firmware/appboot.py): read and validate config.json,
    build the ESP32 HAL, boot the App. Returns the App, or None (reason printed)."""
    from firmware.appboot import build as b
    app = b(config_path)
    unload("firmware.appboot")
    return app


def unload(name):
    """Forget a module (firmware.hal.unload), on CPython too."""
    _hal.unload(name, True)


def main(config_path="config.json"):
    """Board entry point (main.py): validate config.json, build the ESP32 HAL, run."""
    app = build(config_path)
    if app is None:
        return
    hal = app.hal
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
