# Hardware abstraction layer: the interface every HAL implements, plus portable helpers.
#
# Everything above the HAL (outbox, clock, uplink, app, pipeline) imports no hardware
# module; it talks to a HAL object:
#   firmware.hal_esp32.Esp32Hal  the board (machine, network, dht, ntptime)
#   firmware.hal_sim.SimHal      CPython and MicroPython without hardware (tests, fleet simulator)
#
# HAL methods (firmware/hal_base.py Hal has the no-hardware defaults; the ESP32 HAL does not
# subclass it, so the board never loads it):
#   ticks_ms() / ticks_diff(a, b)          monotonic ms (wraps like time.ticks_ms)
#   async sleep_ms(ms)                     sleep on the HAL's clock (virtual in the simulator)
#   read(ch) -> fixed int or None           one channel (CH_*), value * 1000; None = sensor missing
#                                           (per-sample path: must not allocate, no float / long int)
#   fs                                      tiny filesystem: open/rename/remove/listdir/stat/mkdir
#   wifi_connect(ssid, pw) / wifi_connected()
#   ntp() -> epoch ms or None               one NTP query (None when unreachable)
#   open_connection(host, port)            asyncio streams (reader, writer); TLS when use_tls() set it
#   led(on), button() -> bool, wdt_start(ms), wdt_feed(), reset(), mem_free(), mem_alloc(), rand(n)
import os
import sys
import time
import asyncio

# Channel ids (the u8 channel in readings and windows).
CH_TEMP = 0  # DHT22 temperature, degC * 1000
CH_HUM = 1  # DHT22 relative humidity, % * 1000
CH_POT = 2  # potentiometer, % of full scale * 1000
CHANNELS = {"temp": CH_TEMP, "hum": CH_HUM, "pot": CH_POT}

_MP = sys.implementation.name == "micropython"


def unload(name, always=False):
    """Forget a module (its bytecode becomes garbage once nothing refers to it: no function or
    class of it may be kept). Rarely run code is imported on demand and unloaded after; on
    CPython only with always (tests and the simulator keep it loaded)."""
    if not (_MP or always) or sys.modules.pop(name, None) is None:
        return  # not loaded (MicroPython's delattr of a missing module attribute: KeyError)
    pkg, _, sub = name.rpartition(".")
    p = sys.modules.get(pkg)
    if p is not None:
        try:
            delattr(p, sub)
        except (AttributeError, TypeError, KeyError):
            pass


# ---------------------------------------------------------------- portable time helpers

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
    sleep_ms = asyncio.sleep_ms  # asyncio sleep in ms (real time); allocates nothing per call

    def close_stream(w):
        """Close an asyncio stream at once (MicroPython's Stream.close() is a no-op: the socket
        is .s)."""
        try:
            w.close()
            w.s.close()
        except Exception:
            pass
except AttributeError:  # CPython (firmware/cpyticks.py is never copied to the board: RAM)
    from firmware.cpyticks import ticks_ms, ticks_diff, ticks_add, sleep_ms, close_stream


# ---------------------------------------------------------------- filesystem


class PosixFS:
    """The FS interface over `os` and `open`, rooted at a directory (flash root on the board)."""

    def __init__(self, root=""):
        self.root = root.rstrip("/")

    def _p(self, path):
        return self.root + "/" + path if self.root else path

    def open(self, path, mode):
        return open(self._p(path), mode)

    def rename(self, a, b):
        try:
            os.rename(self._p(a), self._p(b))
        except OSError:
            # FAT and some VFS refuse to rename over an existing file; LittleFS replaces atomically.
            if not self.exists(b):
                raise
            os.remove(self._p(b))
            os.rename(self._p(a), self._p(b))

    def remove(self, path):
        os.remove(self._p(path))

    def listdir(self, path=""):
        return os.listdir(self._p(path) if path else (self.root or "."))

    def stat_size(self, path):
        return os.stat(self._p(path))[6]

    def exists(self, path):
        try:
            os.stat(self._p(path))
            return True
        except OSError:
            return False

    def mkdir(self, path):
        if not self.exists(path):
            os.mkdir(self._p(path))
