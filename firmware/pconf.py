# Config helpers of the edge pipeline (pipeline, cep, anomaly): the field checks, Pipeline
# set-up and its rarely run methods (time base, stats). Kept apart from the rule classes so that a
# config without rules or detectors never loads firmware/cep.py or firmware/anomaly.py on the
# board; imported on demand and unloaded after (RAM: docs/firmware.md).
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
# ConfigError lives in firmware/pipeline.py: a class defined here would keep this module's
# globals (every function below) alive after the board unloads it (RAM)
from firmware.pipeline import ConfigError  # noqa: F401 (re-exported)

MAX_CHANNEL = 29  # channel numbers 0..29: masks stay small ints


def _is_num(x):
    return (isinstance(x, int) or isinstance(x, float)) and not isinstance(x, bool)


def need(d, key, rid):
    if key not in d:
        raise ConfigError(rid, "missing field '%s'" % key)
    return d[key]


def fixed(d, key, rid, default=None):
    """Natural-unit number -> fixed point int (x wire.SCALE), int32."""
    if key not in d:
        if default is None:
            raise ConfigError(rid, "missing field '%s'" % key)
        return default
    x = d[key]
    if not _is_num(x):
        raise ConfigError(rid, "'%s' must be a number, got %r" % (key, x))
    if x != x or x * wire.SCALE > wire.I32_MAX or x * wire.SCALE < wire.I32_MIN:
        raise ConfigError(rid, "'%s' out of the int32 fixed-point range: %r" % (key, x))
    return int(round(x * wire.SCALE))  # in the int32 range (checked above)


def integer(d, key, rid, default, lo, hi):
    """A count or a duration in ms (int, or a float with no fraction), lo <= x <= hi."""
    if key not in d:
        if default is None:
            raise ConfigError(rid, "missing field '%s'" % key)
        return default
    x = d[key]
    if not _is_num(x) or x != x or int(x) != x:
        raise ConfigError(rid, "'%s' must be an integer, got %r" % (key, x))
    x = int(x)
    if x < lo or x > hi:
        raise ConfigError(rid, "'%s' must be in %d..%d, got %d" % (key, lo, hi, x))
    return x


def channel_mask(d, key, rid, channels, single=False):
    """Channel name or list of names -> bit mask over channel numbers."""
    names = need(d, key, rid)
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or (single and len(names) != 1):
        raise ConfigError(rid, "'%s' must be %s" % (key, "one channel name" if single else "a channel name or a list of them"))
    m = 0
    for nm in names:
        if not isinstance(nm, str) or nm not in channels:
            raise ConfigError(rid, "unknown channel %r" % (nm,))
        m |= 1 << channels[nm]
    return m


# ---------------------------------------------------------------- Pipeline set-up (boot only)

# Channel numbers for a config that lists names only (the HAL's CH_* ids, firmware/hal.py).
DEFAULT_CHANNELS = {"temp": 0, "hum": 1, "pot": 2}
DEFAULT_WINDOW_MS = 60000
MAX_WINDOW_MS = 0x10000000  # 2**28 ms (~3 days): window arithmetic stays in small ints
DEFAULT_RING = 64  # capacity when the config has a "ring" section without one


def _channels(cfg):
    ch = cfg.get("channels", DEFAULT_CHANNELS)
    out = {}
    if isinstance(ch, dict):
        items = list(ch.items())
    elif isinstance(ch, list):
        items = []
        for nm in ch:
            if nm not in DEFAULT_CHANNELS:
                raise ConfigError("channels", "unknown channel %r: give a {name: number} map" % (nm,))
            items.append((nm, DEFAULT_CHANNELS[nm]))
    else:
        raise ConfigError("channels", "must be a {name: number} map or a list of names")
    if not items:
        raise ConfigError("channels", "no channel")
    used = {}
    for nm, n in items:
        if not isinstance(nm, str) or not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > MAX_CHANNEL:
            raise ConfigError("channels", "%r: channel numbers are 0..%d" % (nm, MAX_CHANNEL))
        if n in used:
            raise ConfigError("channels", "channel number %d used twice" % n)
        used[n] = 1
        out[nm] = n
    return out


def setup(p, config):
    """Parse a pipeline config into Pipeline p: channels, rings, windows, rules, detectors."""
    from firmware.window import EventWindow
    if not isinstance(config, dict):
        raise ConfigError("pipeline", "config must be an object")
    p.channels = _channels(config)
    nch = max(p.channels.values()) + 1
    p.nch = nch
    w = config.get("window")
    if w is None:
        w = {}
    if not isinstance(w, dict):
        raise ConfigError("window", "must be an object")
    p.size_ms = integer(w, "size_ms", "window", DEFAULT_WINDOW_MS, 1, MAX_WINDOW_MS)
    p.offset_ms = integer(w, "offset_ms", "window", 0, 0, MAX_WINDOW_MS) % p.size_ms
    grace = integer(w, "grace_ms", "window", 0, 0, MAX_WINDOW_MS)
    cw = config.get("count_window")
    if cw is not None:
        cw = integer(config, "count_window", "count_window", None, 1, 1000000)
    elif "count" in w:  # same thing inside the "window" section of the device config
        cw = integer(w, "count", "window", None, 1, 1000000)
    # no ring unless the config asks for one: nothing on the device reads it (Pipeline.latest
    # is for tests and tools), 8 bytes per slot and channel plus firmware/ring.py (RAM)
    ring = config.get("ring")
    rcap = 0
    if isinstance(ring, dict):
        rcap = integer(ring, "capacity", "ring", DEFAULT_RING, 1, 4096)
    elif ring is not None:
        rcap = integer(config, "ring", "ring", DEFAULT_RING, 1, 4096)
    p.known = [False] * nch
    p.rings = [None] * nch
    p.windows = [None] * nch
    p.cwindows = [None] * nch
    if rcap:
        from firmware.ring import TimedRing
    if cw is not None:
        from firmware.cwindow import CountWindow
    for n in p.channels.values():
        p.known[n] = True
        if rcap:
            p.rings[n] = TimedRing(rcap)
        p.windows[n] = EventWindow(n, p.size_ms, p.offset_ms, p, grace)
        if cw is not None:
            p.cwindows[n] = CountWindow(n, cw, p)
    # rule and detector classes are loaded only when the config has some (RAM on the board)
    p.rules = []
    p.by_ch = [[] for _ in range(nch)]
    p.absence = []
    if config.get("rules") not in (None, []):
        from firmware.cep import Absence
        from firmware.prules import load_rules
        p.rules = load_rules(config.get("rules"), p.channels, p)
        for r in p.rules:
            for n in range(nch):
                if r.mask & (1 << n):
                    p.by_ch[n].append(r)
            if isinstance(r, Absence):
                p.absence.append(r)
    p.detectors = []
    if config.get("anomaly") not in (None, {}):
        from firmware.prules import load_anomaly
        p.detectors = load_anomaly(config.get("anomaly"), p.channels, p)
    p.det_by_ch = [[] for _ in range(nch)]
    for d in p.detectors:
        p.det_by_ch[d.ch].append(d)


# ---------------------------------------------------------------- Pipeline's rare methods


def set_base(p, base_ms, synced, shift_ms=0):
    """New meaning of relative time 0: epoch ms (synced) or boot ms (unsynced).

    Open windows are closed first, under the old base and flags. shift_ms is how far the
    relative origin itself moves (0 when the caller keeps its t_rel, as the app does on
    clock sync); internal timestamps move by -shift_ms.
    """
    p.close_windows()
    if shift_ms:
        _shift(p, shift_ms)
    p.base_ms = base_ms
    p.synced = bool(synced)
    p.flags = 0 if synced else wire.FLAG_UNSYNCED
    for w in p.windows:
        if w is not None:
            w.reframe()
            w.set_phase(base_ms)


def rebase(p, new_base_ms):
    """Same clock, new origin: every internal time moves by base - new_base_ms. Open
    windows stay open. Call it well before relative times reach 2**29 ms (~6 days)."""
    dt = new_base_ms - p.base_ms
    _shift(p, dt)
    p.base_ms = new_base_ms
    for w in p.windows:
        if w is not None:
            w.set_phase(new_base_ms)


def _shift(p, dt):
    for n in range(p.nch):
        if p.known[n]:
            if p.rings[n] is not None:
                p.rings[n].shift(dt)
            p.windows[n].shift(dt)
            if p.cwindows[n] is not None:
                p.cwindows[n].shift(dt)
    for r in p.rules:
        r.shift(dt)
    for d in p.detectors:
        d.shift(dt)


def stats(p):
    """Counters for the status record and the console (allocates: not per sample)."""
    ow = 0
    for r in p.rings:
        if r is not None:
            ow += r.overwritten
    sup = 0
    for d in p.detectors:
        sup += d.suppressed
    return {"late": p.late, "unknown": p.unknown, "emitted": p.emitted, "overwritten": ow,
            "suppressed": sup, "matches": dict((r.id, r.matches) for r in p.rules)}


def latest(p, ch):
    """(t_rel, value) of the newest sample of a channel, or None."""
    r = p.rings[ch] if 0 <= ch < p.nch else None
    if r is None or r.n == 0:
        return None
    return r.latest_t(0), r.latest_v(0)
