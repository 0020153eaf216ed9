# Circular buffers for the per-sample path: preallocated, array-backed, overwrite-oldest.
#
# Ring:      one typed array, `typecode` bytes per slot ('i' = int32: 4 bytes per slot).
# TimedRing: (timestamp, value) pairs in two int32 arrays: 8 bytes per slot.
# A full ring overwrites its oldest item and counts it in .overwritten (never silent).
# push, at, latest, copy_latest, min, max, sum, mean allocate nothing while the values
# are small ints (|v| < 2**30 on MicroPython); __iter__ is a generator and allocates once.
import array
import struct


class _Slots:
    """Slot bookkeeping shared by both rings: head, fill and overwrite count.

    push() stays written out in each ring (no extra call on the per-sample path).
    """

    def __init__(self, capacity):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError("capacity must be a positive int")
        self.cap = capacity
        self.head = 0  # next slot written
        self.n = 0
        self.overwritten = 0

    def clear(self):
        self.head = 0
        self.n = 0

    def __len__(self):
        return self.n

    def _slot(self, i):
        # Slot of the i-th oldest item (0 <= i < n).
        s = self.head - self.n + i
        if s < 0:
            s += self.cap
        return s

    def _lslot(self, k):
        # Slot of the k-th newest item.
        if k < 0 or k >= self.n:
            raise IndexError("ring index")
        s = self.head - 1 - k
        if s < 0:
            s += self.cap
        return s


class TimedRing(_Slots):
    """Fixed-capacity ring of (t, value) pairs, both int32: 8 bytes per slot.

    t is the pipeline's small-int relative time (ms since its base), never epoch ms.
    """

    def __init__(self, capacity):
        _Slots.__init__(self, capacity)
        self.ts = array.array("i", [0] * capacity)
        self.vs = array.array("i", [0] * capacity)

    def bytes_per_slot(self):
        return 8  # two int32 arrays

    def push(self, t, v):
        h = self.head
        self.ts[h] = t
        self.vs[h] = v
        h += 1
        if h == self.cap:
            h = 0
        self.head = h
        if self.n < self.cap:
            self.n += 1
        else:
            self.overwritten += 1

    def t_at(self, i):
        """Time of the i-th oldest pair."""
        if i < 0 or i >= self.n:
            raise IndexError("ring index")
        return self.ts[self._slot(i)]

    def v_at(self, i):
        if i < 0 or i >= self.n:
            raise IndexError("ring index")
        return self.vs[self._slot(i)]

    def latest_t(self, k=0):
        """Time of the k-th newest pair (0 = newest)."""
        return self.ts[self._lslot(k)]

    def latest_v(self, k=0):
        return self.vs[self._lslot(k)]

    def count_since(self, t0):
        """Pairs with t >= t0, counted from the newest back (stops at the first older one)."""
        c = 0
        s = self.head
        ts = self.ts
        for _ in range(self.n):
            s -= 1
            if s < 0:
                s = self.cap - 1
            if ts[s] < t0:
                break
            c += 1
        return c

    def shift(self, dt):
        """Move every timestamp by -dt (the pipeline's rebase); O(capacity), rare."""
        ts = self.ts
        for i in range(self.cap):
            x = ts[i] - dt
            ts[i] = x if x > -0x20000000 else -0x20000000

    def __iter__(self):
        # Convenience only: allocates a generator and tuples.
        for i in range(self.n):
            s = self._slot(i)
            yield (self.ts[s], self.vs[s])


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
