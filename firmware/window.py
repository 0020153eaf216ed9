# Tumbling windows on the device: event-time windows aligned to the epoch, and count windows.
#
# Per sample the aggregate keeps only small ints: count, min, max, first/last time, and the
# exact sum and sum of squares of d = value - first value of the window, split into limbs
# so no intermediate leaves the MicroPython small-int range (|x| < 2**30). Mean and
# (population) std are computed exactly, in integers, only when the window closes.
# Zero allocation per sample holds for |value| < 2**28 (fixed point, +-268435 units) and
# relative times |t| < 2**29; outside it the arithmetic stays exact and only allocates.
try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

_L24 = const(0x1000000)
_L29 = const(0x20000000)
_M15 = const(0x7FFF)
_SQ_FAST = const(23170)  # a*a < 2**29 below this
_TMIN = const(-0x20000000)


# Agg.limbs: sum of d = [_S1] * 2**24 + [_S0], |[_S0]| < 2**24 after each sample; sum of d*d =
# [_Q2] * 2**30 + [_Q1] * 2**15 + [_Q0] (a list: one name, RAM)
_S0 = const(0)
_S1 = const(1)
_Q0 = const(2)
_Q1 = const(3)
_Q2 = const(4)


def isqrt(n):
    """floor(sqrt(n)) for an int n >= 0, by integer Newton steps (no float)."""
    if n < 0:
        raise ValueError("isqrt of a negative number")
    if n < 2:
        return n
    b = 0  # bit length of n
    x = n
    while x:
        x >>= 1
        b += 1
    x = 1 << ((b + 1) >> 1)
    while True:
        y = (x + n // x) >> 1
        if y >= x:
            return x
        x = y


class Agg:
    """Window aggregate: count, min, max, mean, std, first/last event time."""

    def __init__(self):
        self.limbs = [0, 0, 0, 0, 0]
        self.reset()

    def reset(self):
        self.n = 0
        self.first = 0  # first value: the reference of d
        self.min = 0
        self.max = 0
        self.t0 = 0  # earliest event time seen
        self.t1 = 0  # latest event time seen
        sq = self.limbs
        for i in range(5):
            sq[i] = 0

    def add(self, v, t):
        n = self.n
        if n == 0:
            self.n = 1
            self.first = v
            self.min = v
            self.max = v
            self.t0 = t
            self.t1 = t
            return
        self.n = n + 1
        if v < self.min:
            self.min = v
        elif v > self.max:
            self.max = v
        if t < self.t0:
            self.t0 = t
        elif t > self.t1:
            self.t1 = t
        d = v - self.first
        sq = self.limbs
        s = sq[_S0] + d
        if s >= _L24 or s <= -_L24:
            c = s >> 24
            sq[_S1] += c
            s -= c << 24
        sq[_S0] = s
        a = -d if d < 0 else d
        if a < _SQ_FAST:
            q = sq[_Q0] + a * a
            if q >= _L29:
                q1 = sq[_Q1] + (q >> 15)
                q &= _M15
                if q1 >= _L29:
                    sq[_Q2] += q1 >> 15
                    q1 &= _M15
                sq[_Q1] = q1
            sq[_Q0] = q
            return
        # a*a = h*h*2**30 + 2*h*l*2**15 + l*l with 15-bit halves; every step stays < 2**30.
        h = a >> 15
        lo = a & _M15
        q = sq[_Q0]
        q1 = sq[_Q1] + (q >> 15)
        q = (q & _M15) + lo * lo
        q1 += q >> 15
        sq[_Q0] = q & _M15
        q2 = sq[_Q2] + (q1 >> 15)
        q1 = (q1 & _M15) + 2 * h * lo
        q2 += q1 >> 15
        sq[_Q1] = q1 & _M15
        sq[_Q2] = q2 + h * h

    def sums(self):
        """(sum of d, sum of d*d) as exact ints (may be long ints: call only on close)."""
        sq = self.limbs
        return sq[_S1] * _L24 + sq[_S0], (sq[_Q2] * 32768 + sq[_Q1]) * 32768 + sq[_Q0]

    def result(self):
        """(count, min, max, mean, std); mean rounded half up, population std rounded half up."""
        n = self.n
        if n == 0:
            return 0, 0, 0, 0, 0
        s, q = self.sums()
        mean = self.first + (2 * s + n) // (2 * n)
        var_n2 = n * q - s * s  # n**2 * variance, exact and >= 0
        std = (isqrt(4 * var_n2) + n) // (2 * n)
        return n, self.min, self.max, mean, std

    def shift(self, dt):
        self.t0 = _shift(self.t0, dt)
        self.t1 = _shift(self.t1, dt)


def _shift(t, dt):
    x = t - dt
    return x if x > _TMIN else _TMIN


class EventWindow:
    """Tumbling event-time window [start, start + size) of one channel.

    Windows are aligned to the epoch (plus offset): set_phase() gets the phase of the
    pipeline's base. A sample at t >= end closes the window (sink.on_window(self)) and
    opens the one holding t; empty windows emit nothing. A sample older than the open
    window (or than the last closed one) is late: counted in .late, not added.
    """

    # defaults as class attributes: an instance entry only once set (RAM: a window's attribute
    # table stays at 10 entries instead of 17)
    offset = 0
    grace_ms = 0
    late = 0
    open = False

    def __init__(self, ch, size_ms, offset_ms, sink, grace_ms=0):
        self.ch = ch
        self.size = size_ms
        if offset_ms:
            self.offset = offset_ms
        if grace_ms:
            self.grace_ms = grace_ms
        self.sink = sink
        self.phase = 0
        self.agg = Agg()
        self.start = 0
        self.end = 0
        self.floor = _TMIN  # samples before this are late
        self.t_last = _TMIN  # newest event time summarised so far

    def set_phase(self, base_ms):
        """Alignment for a base (epoch ms or boot ms at relative time 0)."""
        self.phase = (base_ms - self.offset) % self.size

    def add(self, v, t):
        """Returns 0 when the sample went into a window, 1 when it was late."""
        if self.open:
            if t < self.end:
                if t >= self.start:
                    self.agg.add(v, t)
                    return 0
                self.late += 1
                return 1
            self.close()
        elif t < self.floor:
            self.late += 1
            return 1
        s = t - (t + self.phase) % self.size
        self.start = s
        self.end = s + self.size
        self.open = True
        self.agg.add(v, t)
        return 0

    def tick(self, t):
        """Close the open window once t >= end + grace (no sample needed)."""
        if self.open and t >= self.end + self.grace_ms:
            self.close()

    def close(self):
        if not self.open:
            return
        self.open = False
        self.floor = self.end
        if self.agg.t1 > self.t_last:
            self.t_last = self.agg.t1
        self.sink.on_window(self)
        self.agg.reset()

    def reframe(self):
        """New time frame (clock sync): windows restart; only samples older than the newest
        one already summarised are late. Call with no window open."""
        if self.floor > self.t_last:
            self.floor = self.t_last

    def shift(self, dt):
        self.t_last = _shift(self.t_last, dt)
        self.start = _shift(self.start, dt)
        self.end = _shift(self.end, dt)
        self.floor = _shift(self.floor, dt)
        self.agg.shift(dt)
