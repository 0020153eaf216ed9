# Config helpers of the edge pipeline (pipeline, cep, anomaly): ConfigError and the field
# checks. Kept apart from the rule classes so that a config without rules or detectors never
# loads firmware/cep.py or firmware/anomaly.py on the board (RAM: docs/firmware.md).
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)

MAX_CHANNEL = 29  # channel numbers 0..29: masks stay small ints


class ConfigError(ValueError):
    """A bad pipeline config: .rule_id names the rule (or section), .reason says why."""

    def __init__(self, rule_id, reason):
        super().__init__("%s: %s" % (rule_id, reason))
        self.rule_id = rule_id
        self.reason = reason


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
    return wire.to_fixed(x)


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
