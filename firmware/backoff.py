# Exponential backoff with full jitter and a cap (AWS "full jitter"):
#   delay_n = uniform(0, min(cap, base * 2**n))
# rng(n) returns an int in [0, n); inject a deterministic one in tests.


class Backoff:
    def __init__(self, base_ms=1000, cap_ms=60000, rng=None, min_ms=0):
        if base_ms <= 0 or cap_ms < base_ms:
            raise ValueError("need 0 < base_ms <= cap_ms")
        self.base = base_ms
        self.cap = cap_ms
        self.min = min_ms
        self.rng = rng or _default_rng
        self.attempt = 0

    def ceiling(self):
        """Upper bound of the next delay."""
        c = self.base
        i = 0
        while i < self.attempt and c < self.cap:
            c *= 2
            i += 1
        return c if c < self.cap else self.cap

    def next(self):
        """Delay (ms) before the next attempt; every call raises the ceiling until the cap."""
        c = self.ceiling()
        self.attempt += 1
        d = self.rng(c + 1)
        return d if d >= self.min else self.min

    def reset(self):
        self.attempt = 0


def _default_rng(n):
    import random
    return random.getrandbits(30) % n if n > 1 else 0
