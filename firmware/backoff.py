# Exponential backoff with full jitter and a cap (AWS "full jitter"):
#   delay_n = uniform(0, min(cap, base * 2**n))
# rng(n) returns an int in [0, n) (the HAL's rand; inject a deterministic one in tests).


class Backoff:
    def __init__(self, base_ms=1000, cap_ms=60000, rng=None, min_ms=0):
        if base_ms <= 0 or cap_ms < base_ms or rng is None:
            raise ValueError("need 0 < base_ms <= cap_ms and an rng")
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self.min_ms = min_ms
        self.rng = rng
        self.attempt = 0

    def next(self):
        """Delay (ms) before the next attempt, uniform in [0, ceiling] (never below min_ms);
        every call doubles the ceiling, from base_ms up to cap_ms."""
        c = self.base_ms
        i = 0
        while i < self.attempt and c < self.cap_ms:
            c *= 2
            i += 1
        self.attempt += 1
        d = self.rng((c if c < self.cap_ms else self.cap_ms) + 1)
        return d if d >= self.min_ms else self.min_ms

    def reset(self):
        self.attempt = 0
