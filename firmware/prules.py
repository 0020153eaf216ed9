# Parsers of the pipeline's optional parts (boot only): rings, count windows, rules and
# detectors (firmware/cep.py and firmware/anomaly.py hold the classes that run, these build them
# from the config), and the pipeline's stats. Loaded only when the config has some (or for
# stats); the board unloads it after boot (RAM).
from shared import wire_dev as wire  # the device side of the contract
from firmware.pipeline import ConfigError
from firmware.pconf import integer

_DEFAULT_RING = 64  # capacity when the config has a "ring" section without one


def extras(p, config, w):
    """Pipeline set-up (firmware/pconf.py) of the optional parts: per-channel rings, count
    windows, rules and detectors."""
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
        rcap = integer(ring, "capacity", "ring", _DEFAULT_RING, 1, 4096)
    elif ring is not None:
        rcap = integer(config, "ring", "ring", _DEFAULT_RING, 1, 4096)
    nch = p.nch
    if rcap:
        from firmware.ring import TimedRing
        p.rings = [None] * nch
    if cw is not None:
        from firmware.cwindow import CountWindow
        p.cwindows = [None] * nch
    for n in p.channels.values():
        if rcap:
            p.rings[n] = TimedRing(rcap)
        if cw is not None:
            p.cwindows[n] = CountWindow(n, cw, p)
    if config.get("rules") not in (None, []):
        from firmware.cep import Absence
        p.rules = load_rules(config.get("rules"), p.channels, p)
        p.by_ch = [[] for _ in range(nch)]
        p.absence = []
        for r in p.rules:
            for n in range(nch):
                if r.mask & (1 << n):
                    p.by_ch[n].append(r)
            if isinstance(r, Absence):
                p.absence.append(r)
    p.detectors = []  # also in p.det_by_ch (tests read this list)
    if config.get("anomaly") not in (None, {}):
        p.detectors = load_anomaly(config.get("anomaly"), p.channels, p)
        p.det_by_ch = [[] for _ in range(nch)]
    for d in p.detectors:
        p.det_by_ch[d.ch].append(d)


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
    if not (isinstance(x, int) or isinstance(x, float)) or isinstance(x, bool):
        raise ConfigError(rid, "'%s' must be a number, got %r" % (key, x))
    if x != x or x * wire.SCALE > wire.I32_MAX or x * wire.SCALE < wire.I32_MIN:
        raise ConfigError(rid, "'%s' out of the int32 fixed-point range: %r" % (key, x))
    return int(round(x * wire.SCALE))  # in the int32 range (checked above)


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


def stats(p):
    """Counters for the status record and the console (allocates: not per sample)."""
    ow = 0
    for r in p.rings:
        if r is not None:
            ow += r.overwritten
    sup = 0
    for ds in p.det_by_ch:
        for d in ds:
            sup += d.suppressed
    return {"late": p.late, "unknown": p.unknown, "emitted": p.emitted, "overwritten": ow,
            "suppressed": sup, "matches": dict((r.id, r.matches) for r in p.rules)}


def latest(p, ch):
    """(t_rel, value) of the newest sample of a channel, or None."""
    r = p.rings[ch] if 0 <= ch < p.nch else None
    if r is None or r.n == 0:
        return None
    return r.latest_t(0), r.latest_v(0)

_OPS = {">": 0, ">=": 1, "<": 2, "<=": 3}


def _cond(d, rid, channels, what):
    """{"channel": .., "op": ">", "value": 30} -> (mask, op, fixed value)."""
    if not isinstance(d, dict):
        raise ConfigError(rid, "'%s' must be an object with channel, op, value" % what)
    mask = channel_mask(d, "channel", rid, channels)
    op = d.get("op", ">")
    if op not in _OPS:
        raise ConfigError(rid, "'%s.op' must be one of > >= < <=, got %r" % (what, op))
    return mask, _OPS[op], fixed(d, "value", rid)


TYPES = ("threshold", "sequence", "count", "absence", "rate")


def load_rule(d, channels, sink):
    """One rule dict (as parsed from JSON) -> rule object; ConfigError on any problem."""
    from firmware.cep import Threshold, Sequence, Count, Absence, Rate, MAX_WITHIN_MS, MAX_HISTORY
    if not isinstance(d, dict):
        raise ConfigError("?", "a rule must be an object")
    rid = d.get("id")
    if not isinstance(rid, str):
        raise ConfigError("?", "missing or non-string 'id'")
    try:
        wire.check_topic_part(rid, "rule_id", wire.MAX_RULE_ID)
    except wire.WireError:
        raise ConfigError(rid, "id must be 1..%d of [A-Za-z0-9_-]" % wire.MAX_RULE_ID)
    typ = need(d, "type", rid)
    sev = integer(d, "severity", rid, 1, 0, 255)
    if typ == "threshold":
        below = d.get("direction", "above")
        if below not in ("above", "below"):
            raise ConfigError(rid, "'direction' must be 'above' or 'below'")
        below = below == "below"
        enter = fixed(d, "enter", rid)
        leave = fixed(d, "leave", rid, enter)
        if (leave < enter) if below else (leave > enter):
            raise ConfigError(rid, "'leave' must be on the normal side of 'enter' (hysteresis)")
        return Threshold(rid, sev, channel_mask(d, "channel", rid, channels), sink, enter, leave, below,
                         integer(d, "min_duration_ms", rid, 0, 0, MAX_WITHIN_MS))
    if typ == "sequence":
        a = _cond(need(d, "first", rid), rid, channels, "first")
        b = _cond(need(d, "then", rid), rid, channels, "then")
        return Sequence(rid, sev, sink, a, b, integer(d, "within_ms", rid, None, 0, MAX_WITHIN_MS))
    if typ == "count":
        c = _cond(d, rid, channels, "count")
        return Count(rid, sev, sink, c, integer(d, "count", rid, None, 2, MAX_HISTORY),
                     integer(d, "within_ms", rid, None, 0, MAX_WITHIN_MS))
    if typ == "absence":
        mask = channel_mask(d, "channel", rid, channels)
        cond = None
        if "value" in d:
            cond = _cond(d, rid, channels, "absence")
        return Absence(rid, sev, mask, sink, cond, integer(d, "within_ms", rid, None, 1, MAX_WITHIN_MS))
    if typ == "rate":
        delta = fixed(d, "delta", rid)
        if delta < 0:
            raise ConfigError(rid, "'delta' must be >= 0")
        return Rate(rid, sev, channel_mask(d, "channel", rid, channels, True), sink, delta,
                    integer(d, "within_ms", rid, None, 1, MAX_WITHIN_MS),
                    integer(d, "history", rid, 16, 2, MAX_HISTORY))
    raise ConfigError(rid, "unknown rule type %r (known: %s)" % (typ, ", ".join(TYPES)))


def load_rules(rules, channels, sink):
    """List of rule dicts -> list of rules. Rule ids must be unique."""
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise ConfigError("rules", "must be a list of rule objects")
    out = []
    seen = {}
    for d in rules:
        r = load_rule(d, channels, sink)
        if r.id in seen:
            raise ConfigError(r.id, "duplicate rule id")
        seen[r.id] = 1
        out.append(r)
    return out


def _k16(d, rid, default):
    from firmware.anomaly import MAX_K
    if "k" not in d:
        return default
    k = d["k"]
    if not ((isinstance(k, int) or isinstance(k, float)) and not isinstance(k, bool)) or k != k or k <= 0 or k > MAX_K:
        raise ConfigError(rid, "'k' must be a number in (0, %d], got %r" % (MAX_K, k))
    return int(k * k * 16 + 0.5), int(k * 16 + 0.5)


def load_anomaly(cfg, channels, sink):
    """The "anomaly" config section -> list of detectors (each bound to one channel)."""
    from firmware.anomaly import ZScore, Ewma, MAX_WINDOW
    out = []
    if cfg is None:
        return out
    if not isinstance(cfg, dict):
        raise ConfigError("anomaly", "must be an object")
    for key in cfg:
        if key not in ("zscore", "ewma"):
            raise ConfigError("anomaly." + str(key), "unknown detector (known: zscore, ewma)")
    z = cfg.get("zscore")
    if z is not None:
        rid = "anomaly.zscore"
        if not isinstance(z, dict):
            raise ConfigError(rid, "must be an object")
        mask = channel_mask(z, "channels", rid, channels)
        w = integer(z, "window", rid, 32, 4, MAX_WINDOW)
        k = _k16(z, rid, (144, 48))[0]  # default k = 3
        warm = integer(z, "warmup", rid, w, 2, 100000)
        cool = integer(z, "cooldown_ms", rid, 60000, 0, 0x10000000)
        ms = fixed(z, "min_std", rid, 1)
        if ms < 1:
            raise ConfigError(rid, "'min_std' must be > 0")
        for ch in range(30):
            if mask & (1 << ch):
                out.append(ZScore(ch, sink, w, k, warm, cool, ms))
    e = cfg.get("ewma")
    if e is not None:
        rid = "anomaly.ewma"
        if not isinstance(e, dict):
            raise ConfigError(rid, "must be an object")
        mask = channel_mask(e, "channels", rid, channels)
        a = integer(e, "alpha_shift", rid, 4, 1, 10)
        k = _k16(e, rid, (0, 96))[1]  # default k = 6 MAD
        warm = integer(e, "warmup", rid, 16, 1, 100000)
        cool = integer(e, "cooldown_ms", rid, 60000, 0, 0x10000000)
        md = fixed(e, "min_dev", rid, 1)
        if md < 1:
            raise ConfigError(rid, "'min_dev' must be > 0")
        for ch in range(30):
            if mask & (1 << ch):
                out.append(Ewma(ch, sink, a, k, warm, cool, md))
    return out
