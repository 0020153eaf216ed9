# Anomaly detection on the device: a rolling z-score over a ring buffer and an EWMA detector.
#
# Both use only small-int arithmetic per sample and never a square root:
# - z-score: the ring keeps raw values; sums run over d = (v - ref) >> shift with |d| <= 255,
#   so S = sum d and Q = sum d*d stay small. The test |z| > k is the exact integer
#   comparison 16*(n*d - S)**2 > K16 * (n*Q - S**2) with K16 = round(16*k*k), done as
#   quotient and remainder so no product leaves 2**30. ref/shift are re-chosen (O(window))
#   when a value leaves the +-255 range and once per ring turn.
# - EWMA: mean m and mean absolute deviation dev, both exponentially weighted with
#   alpha = 2**-alpha_shift; alert when |v - m| > k * dev (k in MAD units; for normal noise
#   sigma ~ 1.25 * MAD). No squares, so no overflow for any int32 fixed-point value.
# Warm-up: no alert before `warmup` samples. Cooldown: at most one alert per cooldown_ms
# per channel and detector (suppressed ones are counted). min_std / min_dev floor the
# spread so a stuck (constant) signal never alerts on quantisation steps.
# An alert calls sink.on_anomaly(detector, t, (channel, detector_id, score, value, baseline)).
import array
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
from firmware.window import isqrt

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

_DMAX = const(255)
_XCLAMP = const(2048)  # n * 2048 - S > 32767: the D clamp decides, z saturates >= 4
_DCLAMP = const(32767)
_TMIN = const(-0x20000000)
MAX_WINDOW = 32  # keeps n*Q <= 2**26
MAX_K = 8


def _shift(t, dt):
    x = t - dt
    return x if x > _TMIN else _TMIN


class ZScore:
    """Rolling z-score of one channel against the previous `window` samples."""

    def __init__(self, ch, sink, window=32, k16=144, warmup=None, cooldown_ms=60000, min_std=1):
        self.ch = ch
        self.sink = sink
        self.cap = window
        self.buf = array.array("i", [0] * window)
        self.k16 = k16
        self.kq = k16 >> 4
        self.kr = k16 & 15
        self.warmup = window if warmup is None else warmup
        self.cooldown = cooldown_ms
        self.min_std = min_std if min_std > 0 else 1
        self.alerts = 0
        self.suppressed = 0
        self.renorms = 0
        self.reset()

    def reset(self):
        self.n = 0
        self.head = 0
        self.seen = 0
        self.ref = 0
        self.sh = 0
        self.S = 0
        self.Q = 0
        self.cooling = False
        self.t_alert = 0

    def sample(self, v, t):
        n = self.n
        if self.seen < self.warmup:
            self.seen += 1
        elif n > 1:
            self._test(v, t, n)
        # push into the ring and the sums
        h = self.head
        sh = self.sh
        if n == self.cap:
            o = (self.buf[h] - self.ref) >> sh
            self.S -= o
            self.Q -= o * o
        else:
            self.n = n + 1
        self.buf[h] = v
        h += 1
        if h == self.cap:
            h = 0
        self.head = h
        d = (v - self.ref) >> sh
        if d > _DMAX or d < -_DMAX or n == 0:
            self._renorm()
        elif h == 0:
            self.S += d
            self.Q += d * d
            self._renorm()  # once per turn: recentre, shrink the shift
        else:
            self.S += d
            self.Q += d * d

    def _test(self, v, t, n):
        sh = self.sh
        dx = (v - self.ref) >> sh
        if dx > _XCLAMP:
            dx = _XCLAMP
        elif dx < -_XCLAMP:
            dx = -_XCLAMP
        S = self.S
        D = n * dx - S
        if D > _DCLAMP:
            D = _DCLAMP
        elif D < -_DCLAMP:
            D = -_DCLAMP
        V = n * self.Q - S * S
        m = self.min_std >> sh
        if m > _DMAX:
            m = _DMAX
        m *= n
        m *= m
        if V < m:
            V = m
        if V < 1:
            V = 1
        DD = D * D
        q = DD // V
        kq = self.kq
        if q < kq:
            return
        if q == kq and 16 * (DD - q * V) <= self.kr * V:
            return
        if self.cooling and t - self.t_alert < self.cooldown:
            self.suppressed += 1
            return
        self.cooling = True
        self.t_alert = t
        self.alerts += 1
        score = isqrt(DD * 1000000 // V)
        base = self.ref + (S * (1 << sh)) // n
        self.sink.on_anomaly(self, t, (self.ch, wire.DETECTOR_ZSCORE, score if score < wire.I32_MAX else wire.I32_MAX,
                                       v, base))

    def _renorm(self):
        # Recentre on the ring's mid-range; smallest shift with every |d| <= 255; exact resum.
        self.renorms += 1
        buf = self.buf
        n = self.n
        mn = buf[0]
        mx = mn
        for i in range(n):
            x = buf[i]
            if x < mn:
                mn = x
            elif x > mx:
                mx = x
        ref = mn + ((mx - mn) >> 1)
        sh = 0
        while ((mx - ref) >> sh) > _DMAX or ((mn - ref) >> sh) < -_DMAX:
            sh += 1
        S = 0
        Q = 0
        for i in range(n):
            d = (buf[i] - ref) >> sh
            S += d
            Q += d * d
        self.ref = ref
        self.sh = sh
        self.S = S
        self.Q = Q

    def shift(self, dt):
        self.t_alert = _shift(self.t_alert, dt)


class Ewma:
    """EWMA mean and mean absolute deviation of one channel; alert when |v - m| > k * dev."""

    def __init__(self, ch, sink, alpha_shift=4, k16=96, warmup=16, cooldown_ms=60000, min_dev=1):
        self.ch = ch
        self.sink = sink
        self.a = alpha_shift
        self.half = 1 << (alpha_shift - 1)
        self.k16 = k16
        self.kq = k16 >> 4
        self.kr = k16 & 15
        self.warmup = warmup
        self.cooldown = cooldown_ms
        self.min_dev = min_dev if min_dev > 0 else 1
        self.alerts = 0
        self.suppressed = 0
        self.reset()

    def reset(self):
        self.seen = 0
        self.m = 0
        self.dev16 = 0  # dev * 16: four fraction bits so small noise does not stall at 0
        self.cooling = False
        self.t_alert = 0

    def sample(self, v, t):
        if self.seen == 0:
            self.seen = 1
            self.m = v
            return
        e = v - self.m
        ae = -e if e < 0 else e
        if self.seen < self.warmup:
            self.seen += 1
        else:
            dv = self.dev16 >> 4
            if dv < self.min_dev:
                dv = self.min_dev
            q = ae // dv
            kq = self.kq
            if q > kq or (q == kq and (dv >= 0x2000000 or 16 * (ae - q * dv) > self.kr * dv)):
                self._alert(v, t, ae, dv)
        self.m += (e + self.half) >> self.a
        if ae > 0x1000000:
            ae = 0x1000000  # winsorise the spread update; keeps ae << 4 small
        self.dev16 += ((ae << 4) - self.dev16 + self.half) >> self.a

    def _alert(self, v, t, ae, dv):
        if self.cooling and t - self.t_alert < self.cooldown:
            self.suppressed += 1
            return
        self.cooling = True
        self.t_alert = t
        self.alerts += 1
        score = ae * 1000 // dv
        self.sink.on_anomaly(self, t, (self.ch, wire.DETECTOR_EWMA, score if score < wire.I32_MAX else wire.I32_MAX,
                                       v, self.m))

    def shift(self, dt):
        self.t_alert = _shift(self.t_alert, dt)


def load_anomaly(cfg, channels, sink):
    """The "anomaly" config section -> list of detectors (each bound to one channel). The parser
    is in firmware/prules.py (config parsing: the board unloads it after boot)."""
    from firmware.prules import load_anomaly as f
    return f(cfg, channels, sink)
