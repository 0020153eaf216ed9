# Parsers of the pipeline's rules and detectors (boot only): firmware/cep.py and
# firmware/anomaly.py hold the classes that run, these build them from the config. Loaded only
# when the config has rules or detectors; the board unloads it after boot (RAM).
from shared import wire_dev as wire  # the device side of the contract
from firmware.pipeline import ConfigError
from firmware.pconf import need, fixed, integer, channel_mask

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
