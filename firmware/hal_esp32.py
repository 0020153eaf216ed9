# The ESP32 HAL (device only: imports machine, network, dht). Its set-up (pins from
# firmware/pins.py, the drivers) is in firmware/halnet.py.
#
# Sensor values are fixed point (value * 1000) computed without floats:
#   DHT22 from its raw 5-byte frame (tenths of degC / %RH) -> x100; re-measured at most every
#   2 s (the sensor's minimum interval), the cached frame is used in between.
#   pot from ADC read_u16() (11 dB attenuation, ~0..3.3 V) -> % of full scale x1000.
import gc

import machine

from firmware import hal as _hal

try:
    from micropython import const
except ImportError:  # CPython
    from firmware.cpyticks import const

_DHT_MIN_MS = const(2100)  # the DHT22's minimum interval between measurements, and a margin


class Esp32Hal:
    """Every method of the HAL interface (firmware/hal.py); not a subclass of hal_base.Hal, so
    the board does not load the defaults it would override anyway (RAM)."""

    name = "esp32"
    tls = None  # config broker.tls: {"ca": path on self.fs, "server_hostname": name}

    def __init__(self, cfg=None, root=""):
        from firmware import halnet  # the set-up (firmware/halnet.py): unloaded after (RAM)
        halnet.setup(self, root)
        _hal.unload("firmware.halnet")

    # ---- time: the functions themselves, not methods wrapping them (RAM: a function object
    # and its bytecode each)
    ticks_ms = staticmethod(_hal.ticks_ms)
    ticks_diff = staticmethod(_hal.ticks_diff)
    sleep_ms = staticmethod(_hal.sleep_ms)

    # ---- sensors
    def read(self, ch):
        if ch == _hal.CH_POT:
            return (self._adc.read_u16() * 3125) >> 11  # 65535 -> 99998 (= 99.998 %)
        d = self._dht
        if d is None:
            return None
        now = _hal.ticks_ms()  # time.ticks_ms on the board (portable: tests run it on the stubs)
        if self._dht_at is None or _hal.ticks_diff(now, self._dht_at) >= _DHT_MIN_MS:
            self._dht_at = now
            try:
                d.measure()
                self._dht_ok = True
            except Exception:  # OSError (no answer) or a plain Exception("checksum error")
                self._dht_ok = False
        if not self._dht_ok:
            return None
        b = d.buf
        if ch == _hal.CH_TEMP:
            v = ((b[2] & 0x7F) << 8 | b[3]) * 100
            return -v if b[2] & 0x80 else v
        if ch == _hal.CH_HUM:
            return (b[0] << 8 | b[1]) * 100
        return None

    # ---- network
    def wifi_connect(self, ssid, password):
        w = self._wlan
        w.active(True)
        if not w.isconnected():
            w.connect(ssid, password)  # returns at once; wifi_connected() polls; the uplink logs errors

    def wifi_connected(self):
        return self._wlan.isconnected()

    def ntp(self, host=None):
        """One SNTP query (firmware/halnet.py, unloaded after): epoch ms or None."""
        from firmware import halnet
        try:
            return halnet.ntp(self, host)
        finally:
            _hal.unload("firmware.halnet")

    def use_tls(self, tls):
        self.tls = tls or None

    async def open_connection(self, host, port):
        from firmware import halnet  # connect-time code (TLS): unloaded after (RAM)
        try:
            return await halnet.open_stream(host, port, self.tls, self.fs)
        finally:
            _hal.unload("firmware.halnet")

    # ---- board
    def led(self, on):
        self._led.value(1 if on else 0)

    def button(self):
        return self._btn.value() == 0

    def wdt_start(self, ms):
        self._wdt = machine.WDT(timeout=ms)

    def wdt_feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    reset = staticmethod(machine.reset)
    mem_free = staticmethod(getattr(gc, "mem_free", int))  # int: 0 on CPython (tests)
    mem_alloc = staticmethod(getattr(gc, "mem_alloc", int))

    def rand(self, n):
        if n <= 1:
            return 0
        import os
        b = os.urandom(4)
        return ((b[0] << 22) | (b[1] << 14) | (b[2] << 6) | (b[3] >> 2)) % n

    console = staticmethod(print)
