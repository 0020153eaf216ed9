# Complex-event processing (CEP) on the device: declarative rules from the device config,
# evaluated per sample with bounded state. Rule types: threshold (hysteresis, optional
# minimum duration), sequence (A then B within T), count (N matching samples within T),
# absence (no (matching) sample within T, also checked from tick()), rate (|delta| within T).
#
# All config checks happen in load_rules(); they raise ConfigError(rule_id, reason) and
# nothing else. Thresholds arrive in natural units and are converted once to fixed point
# (x wire.SCALE). The per-sample path compares small ints only and allocates nothing; a
# match calls sink.on_cep(rule, t, span_ms, evidence) (allocation is fine there: rare).
# Format and semantics: docs/pipeline.md.
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
from firmware.ring import TimedRing
from firmware.pipeline import ConfigError  # noqa: F401 (re-exported)

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

_GT = const(0)
_GE = const(1)
_LT = const(2)
_LE = const(3)
_TMIN = const(-0x20000000)
MAX_WITHIN_MS = 0x10000000  # 2**28 ms (~3 days): spans stay small ints
MAX_HISTORY = 64


def _cmp(op, v, x):
    if op == _GT:
        return v > x
    if op == _GE:
        return v >= x
    if op == _LT:
        return v < x
    return v <= x


def _shift(t, dt):
    x = t - dt
    return x if x > _TMIN else _TMIN


# ---------------------------------------------------------------- rules


class Rule:
    """Base: id, severity, channel mask; sample() per sample of a listened channel."""

    kind = "rule"

    def __init__(self, rid, severity, mask, sink):
        self.id = rid
        self.severity = severity
        self.mask = mask
        self.sink = sink
        self.matches = 0

    def fire(self, t, span, evidence):
        self.matches += 1
        self.sink.on_cep(self, t, span, evidence)

    def sample(self, ch, v, t):
        pass

    def check(self, t):
        pass

    def shift(self, dt):
        pass

    def reset(self):
        pass


class Threshold(Rule):
    """Enter when v > enter (direction "above"; < for "below"), leave when v < leave
    (> for "below"). Equal to a threshold neither enters nor leaves. Fires once per
    episode, when the state has held for min_duration_ms (0: on the entering sample).
    Evidence: (value at entry, value now, peak)."""

    kind = "threshold"

    def __init__(self, rid, severity, mask, sink, enter, leave, below, min_ms):
        Rule.__init__(self, rid, severity, mask, sink)
        self.enter = enter
        self.leave = leave
        self.below = below
        self.min_ms = min_ms
        self.reset()

    def reset(self):
        self.active = False
        self.fired = False
        self.t_enter = 0
        self.v_enter = 0
        self.peak = 0

    def sample(self, ch, v, t):
        if not self.active:
            if (v < self.enter) if self.below else (v > self.enter):
                self.active = True
                self.fired = False
                self.t_enter = t
                self.v_enter = v
                self.peak = v
            else:
                return
        elif (v > self.leave) if self.below else (v < self.leave):
            self.active = False
            return
        elif (v < self.peak) if self.below else (v > self.peak):
            self.peak = v
        if not self.fired and t - self.t_enter >= self.min_ms:
            self.fired = True
            self.fire(t, t - self.t_enter, (self.v_enter, v, self.peak))

    def shift(self, dt):
        self.t_enter = _shift(self.t_enter, dt)


class Sequence(Rule):
    """A then B within T: a B sample at t_b matches the latest pending A at t_a when
    0 <= t_b - t_a <= within_ms (inclusive). A match consumes the A. A sample that
    completes a match does not also start one. Evidence: (value A, value B)."""

    kind = "sequence"

    def __init__(self, rid, severity, sink, a, b, within):
        Rule.__init__(self, rid, severity, a[0] | b[0], sink)
        self.a_mask, self.a_op, self.a_x = a
        self.b_mask, self.b_op, self.b_x = b
        self.within = within
        self.reset()

    def reset(self):
        self.pending = False
        self.t_a = 0
        self.v_a = 0

    def sample(self, ch, v, t):
        bit = 1 << ch
        if self.pending and self.b_mask & bit and _cmp(self.b_op, v, self.b_x):
            dt = t - self.t_a
            if 0 <= dt <= self.within:
                self.pending = False
                self.fire(t, dt, (self.v_a, v))
                return
        if self.a_mask & bit and _cmp(self.a_op, v, self.a_x):
            self.pending = True
            self.t_a = t
            self.v_a = v

    def shift(self, dt):
        self.t_a = _shift(self.t_a, dt)


class Count(Rule):
    """N matching samples within T (burst): fires when the N newest matching samples span
    <= within_ms (inclusive), then starts over. Evidence: (first value, last value)."""

    kind = "count"

    def __init__(self, rid, severity, sink, cond, n, within):
        Rule.__init__(self, rid, severity, cond[0], sink)
        self.op = cond[1]
        self.x = cond[2]
        self.n = n
        self.within = within
        self.hist = TimedRing(n)

    def reset(self):
        self.hist.clear()

    def sample(self, ch, v, t):
        if not _cmp(self.op, v, self.x):
            return
        h = self.hist
        h.push(t, v)
        if h.n == self.n:
            dt = t - h.t_at(0)
            if dt <= self.within:
                first = h.v_at(0)
                h.clear()
                self.fire(t, dt if dt > 0 else 0, (first, v))

    def shift(self, dt):
        self.hist.shift(dt)


class Absence(Rule):
    """No (matching) sample on the channel(s) for more than within_ms: checked on every
    sample of any channel and on tick(). Fires once per silence; the next matching
    sample re-arms it. The silence is measured from the last matching sample, or from
    the first time the pipeline saw any time at all. Evidence: (last value,) or ()."""

    kind = "absence"

    def __init__(self, rid, severity, mask, sink, cond, within):
        Rule.__init__(self, rid, severity, mask, sink)
        self.has_cond = cond is not None
        self.op = cond[1] if cond else 0
        self.x = cond[2] if cond else 0
        self.within = within
        self.reset()

    def reset(self):
        self.started = False
        self.fired = False
        self.last = 0
        self.has_v = False
        self.v = 0

    def sample(self, ch, v, t):
        if self.has_cond and not _cmp(self.op, v, self.x):
            return
        if not self.started or t >= self.last:
            self.last = t
        self.started = True
        self.fired = False
        self.has_v = True
        self.v = v

    def check(self, t):
        if not self.started:
            self.started = True
            self.last = t
            return
        if not self.fired and t - self.last > self.within:
            self.fired = True
            self.fire(t, t - self.last, (self.v,) if self.has_v else ())

    def shift(self, dt):
        self.last = _shift(self.last, dt)


class Rate(Rule):
    """|v - v'| > delta for an earlier sample v' of the channel at most within_ms before
    (inclusive), looking back over the last `history` samples. After a match the history
    starts over (one alert per jump). Evidence: (earlier value, value now)."""

    kind = "rate"

    def __init__(self, rid, severity, mask, sink, delta, within, history):
        Rule.__init__(self, rid, severity, mask, sink)
        self.delta = delta
        self.within = within
        self.hist = TimedRing(history)

    def reset(self):
        self.hist.clear()

    def sample(self, ch, v, t):
        h = self.hist
        ts = h.ts
        vs = h.vs
        s = h.head
        best = -1
        bs = 0
        for _ in range(h.n):
            s -= 1
            if s < 0:
                s = h.cap - 1
            dt = t - ts[s]
            if dt > self.within:
                break
            d = v - vs[s]
            if d < 0:
                d = -d
            if d > best:
                best = d
                bs = s
        if best > self.delta:
            dt = t - ts[bs]
            ev = (vs[bs], v)
            h.clear()
            self.fire(t, dt if dt > 0 else 0, ev)
        h.push(t, v)

    def shift(self, dt):
        self.hist.shift(dt)


# ---------------------------------------------------------------- loading
# The rule parsers are in firmware/prules.py (config parsing: the board unloads it after boot).


def load_rule(d, channels, sink):
    """One rule dict (as parsed from JSON) -> rule object; ConfigError on any problem."""
    from firmware.prules import load_rule as f
    return f(d, channels, sink)


def load_rules(rules, channels, sink):
    """List of rule dicts -> list of rules. Rule ids must be unique."""
    from firmware.prules import load_rules as f
    return f(rules, channels, sink)
