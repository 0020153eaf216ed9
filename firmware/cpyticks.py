# CPython stand-ins for MicroPython's time.ticks_ms / ticks_diff / ticks_add, asyncio.sleep_ms and
# firmware.hal.close_stream (firmware/hal.py imports them only where time has none;
# tools/deploy.py never copies this file to the board).
import time


def const(x):
    """micropython.const: the firmware imports it from here on CPython (a fallback def in each
    module would be a function object on the board, RAM)."""
    return x


_T0 = time.monotonic()
_PERIOD = 1 << 30
_HALF = _PERIOD >> 1


def ticks_ms():
    return int((time.monotonic() - _T0) * 1000) & (_PERIOD - 1)


def ticks_diff(a, b):
    return ((a - b + _HALF) & (_PERIOD - 1)) - _HALF


def ticks_add(a, d):
    return (a + d) & (_PERIOD - 1)


async def sleep_ms(ms):
    import asyncio
    await asyncio.sleep(ms / 1000)


def close_stream(w):
    """Close an asyncio stream at once: abort its transport, so a drain() stuck on a full send
    buffer ends now (a plain close() would wait for the buffer to drain)."""
    t = getattr(w, "transport", None)
    if t is not None:
        try:
            t.abort()
        except Exception:
            pass
    try:
        w.close()
    except Exception:
        pass
