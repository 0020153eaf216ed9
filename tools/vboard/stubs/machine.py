"""virtual board stub, not hardware: the `machine` module of the edgeflow virtual board.

The MicroPython WebAssembly build has no `machine`; this stub exists only so that firmware
modules can be imported on the virtual board (tools/vboard/). Pins read constant values,
nothing drives real hardware. Never deployed to a real ESP32.
"""
try:
    import _vboard  # the virtual board's host bridge
except ImportError:  # stand-alone (tools/ram_budget.py)
    _vboard = None

VIRTUAL = True
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def unique_id():
    return bytes.fromhex(_vboard.uid()) if _vboard else b"\x02\x00\x00\x00\x00\x01"


def soft_reset():
    # the virtual board starts a fresh interpreter once this command has ended
    if _vboard:
        _vboard.reset()
    raise SystemExit


def reset():
    soft_reset()


def reset_cause():
    return SOFT_RESET


def freq(hz=None):
    return 240000000


def idle():
    pass


def lightsleep(ms=0):
    pass


def deepsleep(ms=0):
    soft_reset()


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 2
    IRQ_RISING = 1

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self._v = 1 if pull == Pin.PULL_UP else 0
        if value is not None:
            self._v = 1 if value else 0

    def init(self, *args, **kw):
        pass

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def irq(self, handler=None, trigger=0):
        return None

    def __call__(self, v=None):
        return self.value(v)


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=None):
        self.pin = pin

    def atten(self, a):
        pass

    def width(self, w):
        pass

    def read(self):
        return 2048

    def read_u16(self):
        return 32768

    def read_uv(self):
        return 1650000


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout

    def feed(self):
        pass


class RTC:
    def __init__(self):
        self._dt = (2000, 1, 1, 5, 0, 0, 0, 0)

    def datetime(self, dt=None):
        if dt is None:
            return self._dt
        self._dt = tuple(dt)

    def memory(self, data=None):
        return b""


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kw):
        pass

    def init(self, **kw):
        pass

    def deinit(self):
        pass
