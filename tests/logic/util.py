# Helpers for tests that run under both CPython (pytest) and MicroPython.


def raises(exc, fn, *args, **kw):
    """Call fn and return the exception it raised; fail if it raised nothing or something else."""
    try:
        fn(*args, **kw)
    except exc as e:
        return e
    raise AssertionError("%s did not raise %s" % (getattr(fn, "__name__", fn), exc.__name__))

