"""What the gateway knows about each device (checkpointed; read by `status`)."""
from operator import attrgetter

# Counter columns, in table order.
COUNTERS = ("received", "duplicates", "dropped_by_device", "skipped_by_hello", "quarantined",
            "late", "unsynced", "deferred", "live", "backlog_received")


class Device:
    __slots__ = ("dev", "fw", "hello_boot", "hello_next_seq", "backlog", "oldest_boot", "oldest_seq",
                 "online", "last_seen", "last_hello", "status") + COUNTERS

    def __init__(self, dev):
        self.dev = dev
        self.fw = ""
        self.hello_boot = -1  # no hello yet: every record counts as live
        self.hello_next_seq = 0
        self.backlog = 0
        self.oldest_boot = 0
        self.oldest_seq = 0
        self.online = 1
        self.last_seen = 0
        self.last_hello = 0
        self.status = None  # latest KIND_STATUS body
        for c in COUNTERS:
            setattr(self, c, 0)

    def backlog_count(self, boot, seqs_first, seqs_last, n):
        """How many of n records of `boot` with seqs in [first, last] are backlog."""
        hb = self.hello_boot
        if boot > hb:
            return 0
        if boot < hb:
            return n
        ns = self.hello_next_seq
        if seqs_first >= ns:
            return 0
        if seqs_last < ns:
            return n
        return -1  # mixed: caller counts one by one


COLUMNS = ("device", "fw", "hello_boot", "hello_next_seq", "backlog", "oldest_boot", "oldest_seq", "online",
           "last_seen_ms", "last_hello_ms") + COUNTERS + ("status_t", "uptime_s", "outbox_records", "outbox_bytes",
                                                           "outbox_dropped", "device_late", "clock_offset_ms",
                                                           "free_mem", "reconnects")

# a device's table row in C (a row per changed device at every checkpoint)
_HEAD = attrgetter("dev", "fw", "hello_boot", "hello_next_seq", "backlog", "oldest_boot", "oldest_seq", "online",
                   "last_seen", "last_hello")
_COUNTS = attrgetter(*COUNTERS)
_NO_STATUS = (None,) * 9
# the columns the data path changes (store.SQL["devices_hot"]: an UPDATE of these, key last)
_HOT = attrgetter("last_seen", *COUNTERS, "dev")


class Registry:
    def __init__(self):
        self.devs = {}
        self.dirty = set()  # full rows to write
        self.hot = set()  # only last_seen and the counters changed, the row is in the table
        self.stored = set()  # devices whose row is in the table (or in a transaction before the next)
        self._f_full, self._f_hot = set(), set()  # the same since the last fold_rows()

    def get(self, dev):
        """The device, its whole row to be written at the next checkpoint."""
        d = self.devs.get(dev)
        if d is None:
            d = self.devs[dev] = Device(dev)
        self.dirty.add(dev)
        return d

    def touch(self, dev):
        """The device, for a change of last_seen or counters only: the next checkpoint updates
        those 11 columns (half the SQLite work of the 29-column row written per message)."""
        d = self.devs.get(dev)
        if d is None or dev not in self.stored:
            return self.get(dev)
        self.hot.add(dev)
        return d

    def row(self, d):
        return _HEAD(d) + _COUNTS(d) + tuple(d.status or _NO_STATUS)

    def _rows(self, dirty, hot):
        devs = self.devs
        return [self.row(devs[dev]) for dev in dirty], [_HOT(devs[dev]) for dev in hot if dev not in dirty]

    def export(self):
        """(full rows, hot rows) since the last export."""
        dirty = self.dirty
        self._f_full |= dirty
        self._f_hot |= self.hot
        out = self._rows(dirty, self.hot)
        self.stored |= dirty
        self.dirty = set()
        self.hot = set()
        return out

    def fold_rows(self):
        """(full rows, hot rows) of every export since the last fold_rows(), each device once,
        as it is now (right after an export: what they exported; a device's later hot columns
        are in its full row already)."""
        out = self._rows(self._f_full, self._f_hot)
        self._f_full, self._f_hot = set(), set()
        return out

    def restore(self, rows):
        for r in rows:
            rec = dict(zip(COLUMNS, r))
            d = self.devs[rec["device"]] = Device(rec["device"])
            d.fw = rec["fw"]
            d.hello_boot, d.hello_next_seq, d.backlog = rec["hello_boot"], rec["hello_next_seq"], rec["backlog"]
            d.oldest_boot, d.oldest_seq, d.online = rec["oldest_boot"], rec["oldest_seq"], rec["online"]
            d.last_seen, d.last_hello = rec["last_seen_ms"], rec["last_hello_ms"]
            for c in COUNTERS:
                setattr(d, c, rec[c])
            if rec["status_t"] is not None:
                d.status = tuple(rec[c] for c in COLUMNS[-9:])
            self.stored.add(d.dev)
