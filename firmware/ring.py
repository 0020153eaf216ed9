# Circular buffers for the per-sample path: preallocated, array-backed, overwrite-oldest.
#
# Ring:      one typed array, `typecode` bytes per slot ('i' = int32: 4 bytes per slot).
# TimedRing: (timestamp, value) pairs in two int32 arrays: 8 bytes per slot.
# A full ring overwrites its oldest item and counts it in .overwritten (never silent).
# push, at, latest, copy_latest, min, max, sum, mean allocate nothing while the values
# are small ints (|v| < 2**30 on MicroPython); __iter__ is a generator and allocates once.
import array
import struct

# _Slots and TimedRing (all the app uses) live in firmware.window: the board never loads this module
from firmware.window import _Slots, TimedRing  # noqa: F401 (re-exported)


class Ring(_Slots):
    """Fixed-capacity ring of ints; index 0 of at() is the oldest, of latest() the newest."""

    def __init__(self, capacity, typecode="i"):
        _Slots.__init__(self, capacity)
        self.buf = array.array(typecode, [0] * capacity)
        self.typecode = typecode

    def bytes_per_slot(self):
        return struct.calcsize(self.typecode)

    def push(self, v):
        h = self.head
        self.buf[h] = v
        h += 1
        if h == self.cap:
            h = 0
        self.head = h
        if self.n < self.cap:
            self.n += 1
        else:
            self.overwritten += 1

    def at(self, i):
        """i-th oldest item (0 = oldest)."""
        if i < 0 or i >= self.n:
            raise IndexError("ring index")
        return self.buf[self._slot(i)]

    def latest(self, k=0):
        """k-th newest item (0 = newest)."""
        return self.buf[self._lslot(k)]

    def copy_latest(self, out, k):
        """Copy the newest min(k, n, len(out)) items into out, oldest first; returns the count."""
        if k > self.n:
            k = self.n
        if k > len(out):
            k = len(out)
        s = self.head - k
        if s < 0:
            s += self.cap
        buf = self.buf
        cap = self.cap
        for j in range(k):
            out[j] = buf[s]
            s += 1
            if s == cap:
                s = 0
        return k

    def __iter__(self):
        # Convenience only: a generator allocates. The per-sample path uses at()/latest().
        for i in range(self.n):
            yield self.buf[self._slot(i)]

    def min(self):
        if self.n == 0:
            raise ValueError("empty ring")
        buf = self.buf
        s = self._slot(0)
        m = buf[s]
        for _ in range(self.n):
            x = buf[s]
            if x < m:
                m = x
            s += 1
            if s == self.cap:
                s = 0
        return m

    def max(self):
        if self.n == 0:
            raise ValueError("empty ring")
        buf = self.buf
        s = self._slot(0)
        m = buf[s]
        for _ in range(self.n):
            x = buf[s]
            if x > m:
                m = x
            s += 1
            if s == self.cap:
                s = 0
        return m

    def sum(self):
        """Exact sum (a long int, so an allocation, only if it leaves the small-int range)."""
        buf = self.buf
        s = self._slot(0) if self.n else 0
        t = 0
        for _ in range(self.n):
            t += buf[s]
            s += 1
            if s == self.cap:
                s = 0
        return t

    def mean(self):
        """Mean rounded half up, in the items' own units (fixed point stays fixed point)."""
        if self.n == 0:
            raise ValueError("empty ring")
        return (2 * self.sum() + self.n) // (2 * self.n)
