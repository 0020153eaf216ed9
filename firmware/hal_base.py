# The HAL interface with no-hardware defaults (firmware/hal.py lists the methods). The simulated
# HAL and test HALs subclass it; the ESP32 HAL implements every method itself, so the board
# never loads this module (RAM: docs/firmware.md).
from firmware.hal import ticks_ms, ticks_diff, sleep_ms, unload


class Hal:
    """Base class with no-hardware defaults; a HAL overrides what it has."""

    fs = None
    name = "base"

    def ticks_ms(self):
        return ticks_ms()

    def ticks_diff(self, a, b):
        return ticks_diff(a, b)

    async def sleep_ms(self, ms):
        await sleep_ms(ms)

    def read(self, ch):
        return None

    def wifi_connect(self, ssid, password):
        pass

    def wifi_connected(self):
        return True

    def ntp(self, host=None):
        return None

    tls = None  # config broker.tls: {"ca": path on self.fs, "server_hostname": name}

    def use_tls(self, tls):
        self.tls = tls or None

    async def open_connection(self, host, port):
        from firmware import halnet  # connect-time code (TLS): unloaded after on MicroPython
        try:
            return await halnet.open_stream(host, port, self.tls, self.fs)
        finally:
            unload("firmware.halnet")

    def led(self, on):
        pass

    def button(self):
        return False

    def wdt_start(self, ms):
        pass

    def wdt_feed(self):
        pass

    def reset(self):
        raise SystemExit("reset")

    def mem_free(self):
        try:
            import gc
            return gc.mem_free()
        except AttributeError:
            return 0

    def mem_alloc(self):
        try:
            import gc
            return gc.mem_alloc()
        except AttributeError:
            return 0

    def rand(self, n):
        """Uniform int in [0, n)."""
        if n <= 1:
            return 0
        import random
        return random.getrandbits(30) % n

    def console(self, line):
        print(line)
