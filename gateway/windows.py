"""Event-time tumbling windows with allowed lateness and revisions.

Window of t: start = t - (t - offset) mod size, covering [start, end = start + size).
With watermark W (the device's for device windows, the global one for groups):
  - fires (revision 0) when W >= end - 1;
  - a record is late-dropped (to table `late`) when end - 1 + allowed_lateness <= W;
  - a record within the lateness into a fired window amends it: revision 1, 2, ...
    (one revision per record, Flink's late firing, so numbering does not depend on
    batching or checkpoint timing);
  - state is purged once W >= end - 1 + allowed_lateness.
A record that opens a window the watermark has already passed (but within the
lateness) fires it at once as revision 0.

Aggregates are exact: count, sum and sum of squares as Python ints of the
fixed-point values (value * wire.SCALE); mean and population std are derived
when a result is emitted, in the same fixed-point unit as every other value.
"""
import math

from .store import open_window_row, since_fold

OK = 0
LATE = 1
AMENDED = 2


# state list slots
_N, _SUM, _SQ, _MIN, _MAX, _REV = range(6)


def _by_start(item):
    return item[0][1]  # ((channel, start), state)


def result_fields(st):
    """(count, sum, min, max, mean, std), fixed point like the readings (divide by wire.SCALE)."""
    n, s, sq = st[_N], st[_SUM], st[_SQ]
    var_num = n * sq - s * s  # n^2 * variance, exact
    std = math.sqrt(var_num) / n if var_num > 0 else 0.0
    return n, s, st[_MIN], st[_MAX], s / n, std


class _Key:
    __slots__ = ("wins", "due")

    def __init__(self):
        self.wins = {}  # (channel, start) -> state list
        self.due = None  # smallest watermark at which a scan has work


class WindowSet:
    """All windows of one scope ('device' or 'group'), keyed by (key, channel, start)."""

    def __init__(self, scope, size_ms, offset_ms, allowed_lateness_ms):
        self.scope = scope
        self.size = size_ms
        self.offset = offset_ms % size_ms
        self.lateness = allowed_lateness_ms
        self.keys = {}
        self.dirty = {}  # (key, ch, start) -> its state list, for the windows whose open state changed
        self.purged = set()  # (key, ch, start) to delete from the open-window table
        self._f_up, self._f_del = set(), set()  # the same since the last fold_rows()
        self._stored = set()  # (key, ch, start) in the open_windows table: restored or folded since
        self.results = []  # emitted results since the last drain, in order
        self.fired = 0
        self.revisions = 0
        self.open_count = 0

    def start_of(self, t):
        return t - (t - self.offset) % self.size

    def due_after(self, key, wm):
        """True if advancing `key`'s watermark (every key's if key is None) to wm fires or
        purges nothing."""
        if key is None:
            for k in self.keys.values():
                if k.due is not None and k.due <= wm:
                    return False
            return True
        k = self.keys.get(key)
        return k is None or k.due is None or k.due > wm

    # ------------------------------------------------------------ adding

    def add_agg(self, key, ch, start, n, s, sq, mn, mx, wm):
        """Fast path for a batch of records of one window. Only taken while the window is
        not due yet (W < end - 1): then it equals adding them one by one. False otherwise."""
        return self.add_aggs(key, start, ((ch, n, s, sq, mn, mx),), wm)

    def add_aggs(self, key, start, aggs, wm):
        """add_agg for (ch, n, sum, sumsq, min, max) of several channels in one window."""
        if wm is not None and wm >= start + self.size - 1:
            return False
        k = self.keys.get(key)
        if k is None:
            k = self.keys[key] = _Key()
        wins, dirty = k.wins, self.dirty
        for ch, n, s, sq, mn, mx in aggs:
            st = wins.get((ch, start))
            if st is None:
                st = wins[(ch, start)] = [n, s, sq, mn, mx, -1]
                self.open_count += 1
                due = start + self.size - 1
                if k.due is None or due < k.due:
                    k.due = due
            else:
                st[_N] += n
                st[_SUM] += s
                st[_SQ] += sq
                if mn < st[_MIN]:
                    st[_MIN] = mn
                if mx > st[_MAX]:
                    st[_MAX] = mx
            dirty[(key, ch, start)] = st
        return True

    def add(self, key, ch, t, v, wm):
        """One record. Returns OK, AMENDED (a revision was emitted) or LATE (not added)."""
        start = t - (t - self.offset) % self.size
        last = start + self.size - 1  # end - 1
        if wm is not None and last + self.lateness <= wm:
            return LATE
        k = self.keys.get(key)
        if k is None:
            k = self.keys[key] = _Key()
        st = k.wins.get((ch, start))
        if st is None:
            st = k.wins[(ch, start)] = [1, v, v * v, v, v, -1]
            self.open_count += 1
            if k.due is None or last < k.due:
                k.due = last
        else:
            st[_N] += 1
            st[_SUM] += v
            st[_SQ] += v * v
            if v < st[_MIN]:
                st[_MIN] = v
            if v > st[_MAX]:
                st[_MAX] = v
        self.dirty[(key, ch, start)] = st
        if wm is not None and wm >= last:
            st[_REV] += 1
            self._emit(key, ch, start, st, wm)
            if st[_REV] > 0:
                self.revisions += 1
                return AMENDED
            self.fired += 1
        return OK

    # ------------------------------------------------------------ watermark

    def advance(self, key, wm):
        """The watermark of `key` (or of the groups) reached wm: fire and purge."""
        k = self.keys.get(key)
        if k is None or k.due is None or wm < k.due:
            return
        size, lateness = self.size, self.lateness
        due = None
        items = list(k.wins.items())
        items.sort(key=_by_start)
        for (ch, start), st in items:
            last = start + size - 1
            if st[_REV] < 0:
                if wm >= last:
                    st[_REV] = 0
                    self.fired += 1
                    self._emit(key, ch, start, st, wm)
                    self.dirty[(key, ch, start)] = st
                else:
                    due = last if due is None or last < due else due
                    continue
            if last + lateness <= wm:
                del k.wins[(ch, start)]
                self.open_count -= 1
                self.dirty.pop((key, ch, start), None)
                self.purged.add((key, ch, start))
            else:
                d = last + lateness
                due = d if due is None or d < due else due
        k.due = due
        if not k.wins:
            del self.keys[key]

    def advance_all(self, wm):
        for key in list(self.keys):
            self.advance(key, wm)

    def _emit(self, key, ch, start, st, wm):
        n, s, mn, mx, mean, std = result_fields(st)
        self.results.append((self.scope, key, ch, start, start + self.size, st[_REV], n, s, mn, mx, mean, std, wm))

    # ------------------------------------------------------------ checkpoint

    def _rows(self, items, purged):
        scope = self.scope
        ups = [open_window_row(scope, k, st) for k, st in items]
        return ups, [(scope, key, ch, start) for key, ch, start in purged]

    def export(self):
        """(open windows changed since the last export, deleted ones, results) since the last
        export. The changed ones as {(key, ch, start): state list}: the live lists, no row built
        per window (a checkpoint marshals them into the state journal at once, before the state
        changes again, store.FoldMerge reads them back); rows() makes table rows of them."""
        dirty, purged = self.dirty, self.purged
        since_fold(self._f_up, self._f_del, dirty, purged)
        res = self.results
        self.dirty, self.purged, self.results = {}, set(), []
        return dirty, purged, res

    def rows(self, changed, deleted):
        """export()'s changed and deleted windows as open_windows rows (upserts, deletes)."""
        return self._rows(changed.items(), deleted)

    def fold_rows(self):
        """(upserts, deletes) of every export since the last fold_rows(), each window once (its
        last op), read from the state as it is now (right after an export: what they exported).
        Deletes only of windows the table holds: one opened and purged between two folds never
        got a row (in a replay, most of them: a second of processing spans minutes of event time)."""
        keys, stored = self.keys, self._stored
        gone = self._f_del & stored
        stored -= self._f_del
        stored |= self._f_up
        ups, dels = self._rows(((k, keys[k[0]].wins[k[1:]]) for k in self._f_up), gone)
        self._f_up, self._f_del = set(), set()
        return ups, dels

    def restore(self, rows):
        for key, ch, start, n, s, sq, mn, mx, rev in rows:
            k = self.keys.get(key)
            if k is None:
                k = self.keys[key] = _Key()
            k.wins[(ch, start)] = [n, s, int(sq), mn, mx, rev]
            self._stored.add((key, ch, start))
            self.open_count += 1
            last = start + self.size - 1
            d = last if rev < 0 else last + self.lateness
            if k.due is None or d < k.due:
                k.due = d
