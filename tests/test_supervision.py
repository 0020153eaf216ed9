"""Supervision (issue 11.4): a sensor error of any type is a missing sample; a crashing task is
counted, logged and restarted; repeated failure resets the board; the watchdog is fed only while
the sampler and the store make progress. The App runs on SimHal without a broker (the uplink
retries its connection in the background)."""
import asyncio
import os
import sys

import pytest

from firmware import hal as _hal
from firmware.app import App
from firmware.hal_sim import SimHal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"device_id": "sup-1", "broker": {"host": "127.0.0.1", "port": 1}, "insecure": True,
       "sample_ms": 100, "watchdog_ms": 2000, "clock": {"ntp_every_s": 0},
       "uplink": {"backoff_base_ms": 1000, "backoff_cap_ms": 2000}}


async def _run_until(app, cond, timeout_s=20.0):
    task = asyncio.create_task(app.run())
    t0 = asyncio.get_event_loop().time()
    try:
        while not cond():
            assert not task.done(), "the app ended: %r" % (task.exception() if task.done() else None)
            assert asyncio.get_event_loop().time() - t0 < timeout_s, app.counters()
            await asyncio.sleep(0.02)
    finally:
        app.kill()
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.CancelledError:
            pass


def test_dht_plain_exception_and_a_crashing_task_do_not_stop_sampling():
    hal = SimHal(seed=2, speed=10.0, console=False)
    read = hal.read

    def flaky_read(ch):
        if ch == _hal.CH_TEMP:
            raise Exception("checksum error")  # what MicroPython's dht driver raises
        return read(ch)

    hal.read = flaky_read
    app = App(CFG, hal)
    app._boot()
    crashes = [0]
    tick = app.outbox.tick

    def crashing_tick(now):
        if crashes[0] < 3:
            crashes[0] += 1
            raise RuntimeError("boom %d" % crashes[0])
        return tick(now)

    app.outbox.tick = crashing_tick
    asyncio.run(_run_until(app, lambda: app.c["samples"] >= 60 and crashes[0] >= 3 and app.outbox.flushes >= 2))
    c = app.counters()
    assert c["sensor_errors"] >= 60 and c["missing"] >= 60  # temp missing each round, the rest sampled
    assert c["readings"] >= 2 * 60 - 3
    assert c["task_errors"] == 3
    assert hal.resets == 0  # 3 failures in a minute: restarted, not reset
    assert any("task store failed" in line for line in hal.lines)
    assert hal.wdt_fed > 0


def test_a_task_failing_again_and_again_resets_the_board():
    hal = SimHal(seed=3, speed=20.0, console=False)
    app = App(CFG, hal)
    app._boot()

    def broken(now):
        raise ValueError("always")

    app.outbox.tick = broken
    asyncio.run(_run_until(app, lambda: hal.resets >= 1))
    assert app.c["task_errors"] > 5
    assert any("keeps failing: reset" in line for line in hal.lines)


def test_watchdog_fed_only_while_tasks_progress():
    hal = SimHal(seed=4, speed=1.0, console=False)
    app = App(CFG, hal)
    app._boot()
    assert app.progressing()  # nothing started yet
    app._beat["sampler"] = app.clock.ms_lo
    app._beat["store"] = app.clock.ms_lo
    assert app.progressing()
    hal.advance(60000)  # a minute without progress of either
    app.clock.update()
    assert not app.progressing()
    app._beat["sampler"] = app._beat["store"] = app.clock.ms_lo
    assert app.progressing()


def test_esp32_hal_counts_dht_checksum_error_as_missing(monkeypatch):
    # the real HAL on the virtual board's stub drivers (same interface as MicroPython's dht)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools", "vboard", "stubs"))
    for m in ("machine", "network", "dht", "firmware.hal_esp32"):
        sys.modules.pop(m, None)
    pytest.importorskip("machine")
    from firmware.hal_esp32 import Esp32Hal
    h = Esp32Hal()
    assert h.read(_hal.CH_TEMP) == 21500 and h.read(_hal.CH_HUM) == 45000
    h._dht.fail = "checksum"
    h._dht_at = None
    assert h.read(_hal.CH_TEMP) is None
    h._dht.fail = "timeout"
    h._dht_at = None
    assert h.read(_hal.CH_HUM) is None
    for m in ("machine", "network", "dht", "firmware.hal_esp32"):
        sys.modules.pop(m, None)
