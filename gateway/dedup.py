"""Exactly-once filter by record identity (device, boot, seq).

Per (device, boot): `hwm`, the highest seq such that every seq <= hwm is accounted
for (received or reported dropped; -1 before the first), and `bits`, an
anti-replay bitmap of `window` seqs above it (bit i <=> seq hwm+1+i accounted).
The bitmap is normalised after every change so bit 0 is always clear: hwm is the
contiguous mark the gateway acks.

A seq more than `window` above hwm is BEYOND: not processed, not acked, not
stored. The device keeps it and resends it; it fits once the gap below it is
filled (by the missing records or a gap record). State stays bounded by
`window` bits per boot and `max_boots` boots per device.

Boots below a device's `min_boot` are retired: every record of them is a
duplicate. The device's hello retires boots below its floor boot (docs/wire.md,
"The hello contract").

Incarnations: a device's flash identity has a random `instance` id (hello). A
hello with a new instance for a known device means its flash was erased (re-flash):
its old boots can never come back, and its boot counter restarts at 1, so the
device's whole state starts afresh (`reflashes` counts it). Instances retired that
way are remembered (the last MAX_RETIRED): a hello from one of them is refused.
"""
from .store import since_fold

NEW = 0
DUP = 1
BEYOND = 2

SAME = "same"
ADOPTED = "adopted"  # first instance seen for the device (new device, or state from wire v1)
REFLASH = "reflash"
RETIRED = "retired"
MAX_RETIRED = 8


class _Dev:
    __slots__ = ("min_boot", "boots", "instance", "nonce", "retired", "reflashes")

    def __init__(self, min_boot=0):
        self.min_boot = min_boot
        self.boots = {}  # boot -> [hwm, bits]
        self.instance = 0  # 0: not known yet
        self.nonce = 0  # of the latest accepted hello; acks echo it (0: none, send no acks)
        self.retired = ()  # earlier instances (re-flashed away), newest last
        self.reflashes = 0


def _normalise(st):
    bits = st[1]
    if bits & 1:
        low_zero = ~bits & (bits + 1)  # lowest clear bit as a power of two
        n = low_zero.bit_length() - 1
        st[1] = bits >> n
        st[0] += n


class Dedup:
    def __init__(self, window=4096, max_boots=16):
        self.window = window
        self.max_boots = max_boots
        self.devs = {}
        self.dirty = set()  # (dev, boot) changed since the last export
        self.removed = set()  # (dev, boot) retired since the last export
        self.dirty_devs = set()  # min_boot changed
        self.dirty_ids = set()  # instance / nonce / retired changed
        # the same since the last fold_rows() (upserted / deleted keys: the last export's op wins)
        self._f_up, self._f_del, self._f_devs, self._f_ids = set(), set(), set(), set()
        self.evicted_boots = 0
        self.reflashes = 0

    # ------------------------------------------------------------ lookups

    def _state(self, dev, boot, create=True):
        d = self.devs.get(dev)
        if d is None:
            if not create:
                return None
            d = self.devs[dev] = _Dev()
            self.dirty_devs.add(dev)
        if boot < d.min_boot:
            return None
        st = d.boots.get(boot)
        if st is None and create:
            st = d.boots[boot] = [-1, 0]
            # a row even if nothing is marked (a seq beyond the window): it counts towards
            # max_boots, and a boot retired by a re-flash and back in the same checkpoint must
            # overwrite its old row, not keep it (no delete goes out for it now)
            self.removed.discard((dev, boot))
            self.dirty.add((dev, boot))
            if len(d.boots) > self.max_boots:
                self._retire_below(dev, d, min(d.boots) + 1)
                self.evicted_boots += 1
                if boot < d.min_boot:
                    return None
        return st

    def hwm(self, dev, boot):
        """Contiguous mark: every seq <= it is accounted for. -1: none; 0xFFFFFFFF: boot retired."""
        d = self.devs.get(dev)
        if d is None:
            return -1
        if boot < d.min_boot:
            return 0xFFFFFFFF
        st = d.boots.get(boot)
        return -1 if st is None else st[0]

    def min_boot(self, dev):
        d = self.devs.get(dev)
        return 0 if d is None else d.min_boot

    def peek(self, dev, boot, seq):
        st = self._state(dev, boot, create=False)
        if st is None:
            d = self.devs.get(dev)
            return DUP if d is not None and boot < d.min_boot else (NEW if seq < self.window else BEYOND)
        off = seq - st[0] - 1
        if off < 0:
            return DUP
        if off >= self.window:
            return BEYOND
        return DUP if st[1] >> off & 1 else NEW

    # ------------------------------------------------------------ marking

    def mark(self, dev, boot, seq):
        """Account one record; returns NEW, DUP or BEYOND (BEYOND leaves no trace)."""
        st = self._state(dev, boot)
        if st is None:
            return DUP
        off = seq - st[0] - 1
        if off < 0:
            return DUP
        if off >= self.window:
            return BEYOND
        m = 1 << off
        if st[1] & m:
            return DUP
        st[1] |= m
        if off == 0:
            _normalise(st)
        self.dirty.add((dev, boot))
        return NEW

    def mark_run(self, dev, boot, first, n):
        """Fast path for seqs first..first+n-1: NEW or DUP if the whole run is one, else None."""
        st = self._state(dev, boot)
        if st is None:
            return DUP
        hwm = st[0]
        if first == hwm + 1 and st[1] == 0:
            st[0] = hwm + n
            self.dirty.add((dev, boot))
            return NEW
        if first + n - 1 <= hwm:
            return DUP
        return None

    def mark_range(self, dev, boot, first, length, limit=True):
        """Account seqs first..first+length-1 (a device-reported gap, or a hello floor).

        Returns how many were newly accounted, or None if part lies beyond the window
        (nothing changed) and limit is set.
        """
        st = self._state(dev, boot)
        if st is None:
            return 0
        last = first + length - 1
        hwm = st[0]
        if last <= hwm:
            return 0
        if first <= hwm + 1:
            span = last - hwm
            # never build a mask of span bits: a hostile floor of 2^32 would allocate 512 MB
            below = st[1] if span >= st[1].bit_length() else st[1] & ((1 << span) - 1)
            newly = span - bin(below).count("1")
            st[1] >>= span
            st[0] = last
            _normalise(st)
        else:
            off0 = first - hwm - 1
            if last - hwm - 1 >= self.window:
                if limit:
                    return None
            mask = ((1 << length) - 1) << off0
            newly = length - bin(st[1] & mask).count("1")
            st[1] |= mask
        if newly:
            self.dirty.add((dev, boot))
        return newly

    def _dev(self, dev):
        d = self.devs.get(dev)
        if d is None:
            d = self.devs[dev] = _Dev()
            self.dirty_devs.add(dev)
        return d

    def hello(self, dev, floor_boot, floor_seq):
        """The device will never send a record below its floor (floor_boot, floor_seq) again.

        Retires older boots and raises the mark of floor_boot to floor_seq - 1.
        Returns how many seqs were accounted only by this (never received, no gap record).
        """
        d = self._dev(dev)
        if floor_boot < d.min_boot:
            return 0  # a stale hello: newer information is already in
        self._retire_below(dev, d, floor_boot)
        if floor_seq > 0:
            return self.mark_range(dev, floor_boot, 0, floor_seq, limit=False) or 0
        return 0

    def incarnation(self, dev, instance):
        """Classify a hello's instance id: SAME, ADOPTED (first one seen), REFLASH (new
        flash identity: the device's state restarts; returns after the reset) or RETIRED
        (an instance re-flashed away: refuse the hello)."""
        d = self._dev(dev)
        if instance == d.instance:
            return SAME
        if instance in d.retired:
            return RETIRED
        self.dirty_ids.add(dev)
        if d.instance == 0:
            d.instance = instance
            return ADOPTED
        d.retired = (d.retired + (d.instance,))[-MAX_RETIRED:]
        d.instance = instance
        d.nonce = 0
        d.reflashes += 1
        self.reflashes += 1
        for b in list(d.boots):
            del d.boots[b]
            self.dirty.discard((dev, b))
            self.removed.add((dev, b))
        d.min_boot = 0
        self.dirty_devs.add(dev)
        return REFLASH

    def set_nonce(self, dev, nonce):
        d = self._dev(dev)
        if d.nonce != nonce:
            d.nonce = nonce
            self.dirty_ids.add(dev)

    def nonce(self, dev):
        d = self.devs.get(dev)
        return 0 if d is None else d.nonce

    def instance(self, dev):
        d = self.devs.get(dev)
        return 0 if d is None else d.instance

    def _retire_below(self, dev, d, boot):
        if boot <= d.min_boot:
            return
        d.min_boot = boot
        self.dirty_devs.add(dev)
        for b in [b for b in d.boots if b < boot]:
            del d.boots[b]
            self.dirty.discard((dev, b))
            self.removed.add((dev, b))

    # ------------------------------------------------------------ checkpoint

    def _rows(self, keys, removed, dev_keys):
        devs = self.devs
        ups = []
        for dev, boot in keys:
            hwm, bits = devs[dev].boots[boot]
            # only the bytes the bitmap uses (restore reads any length): an in-order device's is
            # empty, not window/8 bytes rewritten for every device at every checkpoint
            ups.append((dev, boot, hwm, bits.to_bytes((bits.bit_length() + 7) // 8, "little") if bits else b""))
        return ups, list(removed), {dev: devs[dev].min_boot for dev in dev_keys}

    def export(self):
        """Rows changed since the last export: (upserts, deletes, {dev: min_boot})."""
        dirty, removed = self.dirty, self.removed
        since_fold(self._f_up, self._f_del, dirty, removed)
        self._f_devs |= self.dirty_devs
        out = self._rows(dirty, removed, self.dirty_devs)
        self.dirty = set()
        self.removed = set()
        self.dirty_devs = set()
        return out

    def _id_rows(self, devs):
        rows = []
        for dev in devs:
            d = self.devs.get(dev)
            if d is not None:
                rows.append((dev, d.instance, d.nonce, " ".join(str(i) for i in d.retired), d.reflashes))
        return rows

    def export_ids(self):
        """Changed identity rows: (device, instance, nonce, retired as text, reflashes)."""
        self._f_ids |= self.dirty_ids
        rows = self._id_rows(self.dirty_ids)
        self.dirty_ids = set()
        return rows

    def fold_rows(self):
        """What the exports since the last fold_rows() merge to, each key once (its last op),
        read from the state as it is now: right after an export it is what they exported.
        (upserts, deletes, {dev: min_boot}, identity rows)."""
        ups, dels, mins = self._rows(self._f_up, self._f_del, self._f_devs)
        ids = self._id_rows(self._f_ids)
        self._f_up, self._f_del, self._f_devs, self._f_ids = set(), set(), set(), set()
        return ups, dels, mins, ids

    def restore_ids(self, rows):
        for dev, inst, nonce, retired, reflashes in rows:
            d = self._dev(dev)
            d.instance, d.nonce, d.reflashes = inst or 0, nonce or 0, reflashes or 0
            d.retired = tuple(int(x) for x in (retired or "").split())[-MAX_RETIRED:]
            self.reflashes += d.reflashes
        self.dirty_devs = set()

    def restore(self, rows, min_boots):
        for dev, mb in min_boots.items():
            self.devs[dev] = _Dev(mb)
        for dev, boot, hwm, bits in rows:
            d = self.devs.get(dev)
            if d is None:
                d = self.devs[dev] = _Dev()
            d.boots[boot] = [hwm, int.from_bytes(bits, "little")]
