"""Reconnect-storm admission: backlog replay credits from a token bucket.

Live records (the current boot, seq >= the next_seq announced in the device's
latest hello) flow without credits. Backlog (everything older) is replayed
only within credits, granted through acks. At most `max_replayers` devices
replay at once; the rest wait in arrival order. Credits are additive grants;
an ack with replay=0 tells the device to drop its allowance and hold.
"""
import collections


class _Replayer:
    __slots__ = ("backlog", "granted", "received", "last_progress")

    def __init__(self, backlog, now):
        self.backlog = backlog
        self.granted = 0
        self.received = 0
        self.last_progress = now


class Admission:
    def __init__(self, rate, burst, max_replayers, chunk, timeout_s, now):
        self.rate = rate / 1000.0  # tokens per ms
        self.burst = burst
        self.max_replayers = max_replayers
        self.chunk = chunk
        self.timeout_ms = timeout_s * 1000
        self.tokens = float(burst)
        self.last = now
        self.active = {}  # dev -> _Replayer
        self.waiting = collections.OrderedDict()  # dev -> (backlog, since)
        self.credits_granted = 0
        self.backlog_announced = 0
        self.admitted = 0
        self.timeouts = 0

    def _refill(self, now):
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def hello(self, dev, backlog, now):
        """A (re)connecting device announces its backlog; returns True if it was admitted."""
        self.active.pop(dev, None)
        self.waiting.pop(dev, None)
        if backlog <= 0:
            return False
        self.backlog_announced += backlog
        if len(self.active) < self.max_replayers:
            self.active[dev] = _Replayer(backlog, now)
            self.admitted += 1
            return True
        self.waiting[dev] = (backlog, now)
        return False

    def backlog_received(self, dev, n, now):
        """n backlog records of dev arrived (new or duplicates: a resent record still
        spends the credit it was sent under)."""
        r = self.active.get(dev)
        if r is not None:
            r.received += n
            r.last_progress = now

    def leave(self, dev):
        self.active.pop(dev, None)
        self.waiting.pop(dev, None)

    def grant(self, dev, now, paused=False):
        """(credits, replay) for the next ack to dev. Debits the bucket."""
        r = self.active.get(dev)
        if r is None:
            return 0, dev not in self.waiting
        if paused:
            return 0, True
        self._refill(now)
        want = min(self.chunk - (r.granted - r.received), r.backlog - r.granted)
        c = int(min(want, self.tokens))
        if c <= 0:
            return 0, True
        self.tokens -= c
        r.granted += c
        self.credits_granted += c
        if r.granted >= r.backlog:
            del self.active[dev]  # its whole backlog is granted: free the slot
        return c, True

    def tick(self, now, paused=False):
        """Release stalled replayers, admit waiting ones. Returns devices that should get a
        grant ack now (newly admitted, or replayers with nothing outstanding)."""
        out = []
        for dev, r in list(self.active.items()):
            if now - r.last_progress >= self.timeout_ms and r.granted > r.received:
                # stalled: free the slot, but queue the rest of its backlog again so the
                # device is never left holding records with no credits
                del self.active[dev]
                self.timeouts += 1
                self.waiting[dev] = (max(1, r.backlog - r.received), now)
            elif r.granted <= r.received:
                out.append(dev)
        while self.waiting and len(self.active) < self.max_replayers:
            dev, (backlog, _since) = self.waiting.popitem(last=False)
            self.active[dev] = _Replayer(backlog, now)
            self.admitted += 1
            out.append(dev)
        return [] if paused else out
