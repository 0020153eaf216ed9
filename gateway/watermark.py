"""Event-time watermarks, per device and across the fleet.

Formulas (Flink's bounded-out-of-orderness conventions):
  device watermark  W_d = max_t_d - out_of_orderness - 1      (None before the first record)
  global watermark  W   = max(W_previous, min over active devices of W_d)

A device is active from its first synced record until it is idle: no data for
idle_timeout of processing time, or its last will / state says offline. It
rejoins the minimum with its next record. W never goes backwards: a rejoining
device whose W_d is below W does not pull W down; its records that fall into
group windows already closed beyond the allowed lateness (end - 1 + lateness
<= W) are late. If no device is active W stays where it is.

The minimum is kept in a heap of (max_t, device), one entry per device, re-keyed lazily:
a device's entry keeps an older max_t (a lower bound) until it reaches the top, so a record
costs O(1) unless its device holds the minimum, not a push per message (a 10,000-device
storm pushed 150,000 entries). The idle check scans the fleet only when the earliest
possible idle time has come, not on every timer tick.
"""
import heapq


class _DevWm:
    __slots__ = ("max_t", "last_data", "active", "online", "in_heap")

    def __init__(self):
        self.max_t = None
        self.last_data = 0
        self.active = False
        self.online = True
        self.in_heap = False  # its entry is in the heap (key <= max_t)


class Watermarks:
    def __init__(self, out_of_orderness_ms, idle_timeout_ms):
        self.delay = out_of_orderness_ms + 1
        self.idle_timeout = idle_timeout_ms
        self.devs = {}
        self.global_wm = None
        self._heap = []  # (max_t, dev), one per device; a stale key is fixed when it surfaces
        self._idle_due = float("inf")  # no active device can go idle before this (tick)
        self.dirty = set()
        self.global_dirty = False
        self._f_devs, self._f_global = set(), False  # the same since the last fold_rows()
        self.idle_transitions = 0
        self.rejoins = 0

    def device_wm(self, dev):
        d = self.devs.get(dev)
        return None if d is None or d.max_t is None else d.max_t - self.delay

    def observe(self, dev, max_t, now):
        """Records up to event time max_t arrived from dev. Returns the device's watermark."""
        d = self.devs.get(dev)
        if d is None:
            d = self.devs[dev] = _DevWm()
        d.last_data = now
        if now + self.idle_timeout < self._idle_due:  # an activation (or the clock stepped back)
            self._idle_due = now + self.idle_timeout
        if d.max_t is None or max_t > d.max_t:
            d.max_t = max_t
            self.dirty.add(dev)
            advanced = True
        else:
            advanced = False
        if not d.active:
            d.active = True
            d.online = True
            self.rejoins += 1
            advanced = True
        if advanced:
            if not d.in_heap:
                d.in_heap = True
                heapq.heappush(self._heap, (d.max_t, dev))
                self._recompute()
            elif self._heap[0][1] == dev:
                self._recompute()
            # else its entry is below the top, which _recompute left valid (active, its key
            # current) and nothing here changed: the minimum, and W, stay as they are
        return d.max_t - self.delay

    def set_online(self, dev, online):
        d = self.devs.get(dev)
        if d is None:
            d = self.devs[dev] = _DevWm()
        d.online = online
        self.dirty.add(dev)
        if not online and d.active:
            d.active = False
            self.idle_transitions += 1
            self._recompute()

    def tick(self, now):
        """Processing-time check for idle devices. observe() keeps _idle_due at or below every
        active device's last_data + idle_timeout, so nothing can go idle before it: the scan
        of the fleet runs only then."""
        if now < self._idle_due:
            return
        changed = False
        due = float("inf")
        timeout = self.idle_timeout
        for d in self.devs.values():
            if d.active:
                if now - d.last_data >= timeout:
                    d.active = False
                    self.idle_transitions += 1
                    changed = True
                elif d.last_data + timeout < due:
                    due = d.last_data + timeout
        self._idle_due = due
        if changed:
            self._recompute()

    def _rebuild(self):
        h = self._heap = []
        for dev, d in self.devs.items():
            d.in_heap = d.active and d.max_t is not None
            if d.in_heap:
                h.append((d.max_t, dev))
        heapq.heapify(h)
        self._idle_due = float("-inf")  # scan at the next tick

    def _recompute(self):
        h, devs = self._heap, self.devs
        while h:
            mt, dev = h[0]
            d = devs[dev]
            if not d.active:
                heapq.heappop(h)  # idle or offline: it leaves; it is pushed again when it rejoins
                d.in_heap = False
            elif d.max_t != mt:
                heapq.heapreplace(h, (d.max_t, dev))  # the device advanced since: its key now
            else:
                w = mt - self.delay
                if self.global_wm is None or w > self.global_wm:
                    self.global_wm = w
                    self.global_dirty = True
                return

    def lag(self, dev, now):
        w = self.device_wm(dev)
        return None if w is None else now - w

    def active_count(self):
        # over a copy: the metrics endpoint's thread calls it while the event loop adds devices
        return sum(1 for d in list(self.devs.values()) if d.active)

    # ------------------------------------------------------------ checkpoint

    def _rows(self, keys):
        devs = self.devs
        return [(dev, devs[dev].max_t, 1 if devs[dev].online else 0) for dev in keys]

    def export(self):
        """([(dev, max_t, online)] changed since the last export, the global watermark)."""
        self._f_devs |= self.dirty
        self._f_global = self._f_global or self.global_dirty
        rows = self._rows(self.dirty)
        self.dirty = set()
        self.global_dirty = False
        return rows, self.global_wm

    def fold_rows(self):
        """The rows of every export since the last fold_rows(), as the state is now (right
        after an export: what they exported), and whether the global watermark changed."""
        rows, changed = self._rows(self._f_devs), self._f_global
        self._f_devs, self._f_global = set(), False
        return rows, changed

    def restore(self, rows, global_wm, now):
        """rows: (dev, max_t, online). Restored online devices are active with a fresh
        idle timeout, so a restart does not let the first device to speak race ahead."""
        for dev, max_t, online in rows:
            d = self.devs[dev] = _DevWm()
            d.max_t = max_t
            d.online = bool(online)
            d.active = bool(online) and max_t is not None
            d.last_data = now
        self.global_wm = global_wm
        self._rebuild()
        self._recompute()
        self.global_dirty = False
