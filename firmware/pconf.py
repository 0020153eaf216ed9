# Config helpers of the edge pipeline: Pipeline set-up (channels, windows) and its rarely run
# methods (time base). Rings, count windows, rules and detectors are set up by
# firmware/prules.py, loaded only when the config has some, so that a config without them never
# loads their code or interns their names on the board; imported on demand and unloaded after
# (RAM: docs/firmware.md).
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
# ConfigError lives in firmware/pipeline.py: a class defined here would keep this module's
# globals (every function below) alive after the board unloads it (RAM)
from firmware.pipeline import ConfigError  # noqa: F401 (re-exported)

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

_MAX_CHANNEL = const(29)  # channel numbers 0..29: masks stay small ints


def integer(d, key, rid, default, lo, hi):
    """A count or a duration in ms (int, or a float with no fraction), lo <= x <= hi."""
    if key not in d:
        if default is None:
            raise ConfigError(rid, "missing field '%s'" % key)
        return default
    x = d[key]
    if not (isinstance(x, int) or isinstance(x, float)) or isinstance(x, bool) or x != x or int(x) != x:
        raise ConfigError(rid, "'%s' must be an integer, got %r" % (key, x))
    x = int(x)
    if x < lo or x > hi:
        raise ConfigError(rid, "'%s' must be in %d..%d, got %d" % (key, lo, hi, x))
    return x


# ---------------------------------------------------------------- Pipeline set-up (boot only)

# Channel numbers for a config that lists names only (the HAL's CH_* ids, firmware/hal.py).
# RAM: const tuples' strings are not interned (docs/firmware.md)
_DEFAULT_CHANNELS = const((("temp", 0), ("hum", 1), ("pot", 2)))
_DEFAULT_WINDOW_MS = const(60000)
_MAX_WINDOW_MS = const(0x10000000)  # 2**28 ms (~3 days): window arithmetic stays in small ints


def setup(self, config):
    """Parse a pipeline config into the Pipeline: channels, windows; rings, count windows,
    rules and detectors (firmware/prules.py, loaded only when the config has some)."""
    from firmware.window import EventWindow
    if not isinstance(config, dict):
        raise ConfigError("pipeline", "config must be an object")
    ch = config.get("channels")
    if ch is None:
        ch = dict(_DEFAULT_CHANNELS)
    out = {}
    if isinstance(ch, dict):
        items = list(ch.items())
    elif isinstance(ch, list):
        items = []
        for nm in ch:
            for dn, n in _DEFAULT_CHANNELS:
                if dn == nm:
                    items.append((nm, n))
                    break
            else:
                raise ConfigError("channels", "unknown channel %r: give a {name: number} map" % (nm,))
    else:
        raise ConfigError("channels", "must be a {name: number} map or a list of names")
    if not items:
        raise ConfigError("channels", "no channel")
    for nm, n in items:
        if not isinstance(nm, str) or not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > _MAX_CHANNEL:
            raise ConfigError("channels", "%r: channel numbers are 0..%d" % (nm, _MAX_CHANNEL))
        if n in out.values():
            raise ConfigError("channels", "channel number %d used twice" % n)
        out[nm] = n
    self.channels = out
    nch = max(out.values()) + 1
    self.nch = nch
    w = config.get("window")
    if w is None:
        w = {}
    if not isinstance(w, dict):
        raise ConfigError("window", "must be an object")
    self.size_ms = integer(w, "size_ms", "window", _DEFAULT_WINDOW_MS, 1, _MAX_WINDOW_MS)
    self.offset_ms = integer(w, "offset_ms", "window", 0, 0, _MAX_WINDOW_MS) % self.size_ms
    grace = integer(w, "grace_ms", "window", 0, 0, _MAX_WINDOW_MS)
    self.known = [False] * nch
    self.windows = [None] * nch
    for n in out.values():
        self.known[n] = True
        self.windows[n] = EventWindow(n, self.size_ms, self.offset_ms, self, grace)
    # none of the optional parts (RAM: one shared list of None, empty tuples); firmware/prules.py
    # gives the pipeline its own lists for the parts the config has
    self.rings = self.cwindows = [None] * nch
    self.rules = self.absence = ()
    self.by_ch = self.det_by_ch = [()] * nch
    # no ring, count window, rule or detector unless the config asks for one: their code and
    # names stay off the board (RAM)
    if (config.get("ring") is None and config.get("count_window") is None and "count" not in w
            and config.get("rules") in (None, []) and config.get("anomaly") in (None, {})):
        return
    from firmware.prules import extras
    extras(self, config, w)


# ---------------------------------------------------------------- Pipeline's rare methods


def set_base(self, base_ms, synced, shift_ms=0):
    """New meaning of relative time 0: epoch ms (synced) or boot ms (unsynced).

    Open windows are closed first, under the old base and flags. shift_ms is how far the
    relative origin itself moves (0 when the caller keeps its t_rel, as the app does on
    clock sync); internal timestamps move by -shift_ms.
    """
    self.close_windows()
    if shift_ms:
        _shift(self, shift_ms)
    self.base_ms = base_ms
    self.synced = bool(synced)
    self.flags = 0 if synced else wire.FLAG_UNSYNCED
    for w in self.windows:
        if w is not None:
            w.reframe()
            w.set_phase(base_ms)


def rebase(self, new_base_ms):
    """Same clock, new origin: every internal time moves by base - new_base_ms. Open
    windows stay open. Call it well before relative times reach 2**29 ms (~6 days)."""
    dt = new_base_ms - self.base_ms
    _shift(self, dt)
    self.base_ms = new_base_ms
    for w in self.windows:
        if w is not None:
            w.set_phase(new_base_ms)


def _shift(self, dt):
    for n in range(self.nch):
        if self.known[n]:
            if self.rings[n] is not None:
                self.rings[n].shift(dt)
            self.windows[n].shift(dt)
            if self.cwindows[n] is not None:
                self.cwindows[n].shift(dt)
    for r in self.rules:
        r.shift(dt)
    for ds in self.det_by_ch:  # each detector watches one channel
        for d in ds:
            d.shift(dt)
