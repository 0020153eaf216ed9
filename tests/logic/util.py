# Helpers for tests that run under both CPython (pytest) and MicroPython.


def raises(exc, fn, *args, **kw):
    """Call fn and return the exception it raised; fail if it raised nothing or something else."""
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("%s did not raise %s" % (getattr(fn, "__name__", fn), exc.__name__))


def reading(ob, ch, t, flags, value, now_ms=None):
    """Store a raw reading through Outbox.append (the device's own path is reading_at)."""
    return ob.append(1, t, flags, (ch, value), now_ms)  # 1: wire.KIND_READING
