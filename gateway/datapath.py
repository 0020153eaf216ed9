"""The gateway's per-message data path: readings batches through dedup, windows and watermarks.

gateway.service.Gateway derives from DataPath: these are its handlers of data messages
(_on_data down to the window and watermark updates), kept here so that Cython can compile them
(setup.py, gateway/datapath.pxd: the Gateway's hot attributes as C fields of this base class)
like gateway/batch.py, windows.py and watermark.py; gateway/accel.py takes the compiled build
only if it was built from these very sources, else this module runs as plain Python. Other
state of the Gateway lives in its instance dict as before.
"""
from bisect import bisect_left

from shared import wire

from .accel import batch
from .dedup import BEYOND, DUP
from .store import RAW_COLS
from .windows import LATE

_UNSYNCED = wire.FLAG_UNSYNCED
assert RAW_COLS == 7, "batch.raw_rows fills store.RAW_COLS columns"
_MIN_TIME_MS = wire.MIN_TIME_MS

# Unsynced times are ms since the device booted: anything outside this cannot be one (and a
# value beyond int64 would make the commit fail).
MAX_UNSYNCED_MS = 1 << 40


class DataPath:
    """The data handlers of service.Gateway (its base class)."""

    def _on_data(self, topic, dev, devb, payload, now):
        h = batch.head(payload, devb)
        if h is not None:  # a readings batch of this device, seqs base..base+n-1: the common batch
            self._readings_fast(topic, dev, h, payload, now)
            return
        # anything unusual: the full decoder says exactly what is wrong
        try:
            mtype, pdev, boot, recs = wire.decode_data(payload)
        except wire.WireError as e:
            self._quarantine(topic, dev, e.reason, e.detail, payload, now)
            return
        if pdev != dev:
            self._quarantine(topic, dev, "spoofed_device_id", "payload says %r" % pdev, payload, now)
            return
        if mtype == wire.MSG_READINGS:
            self._readings(topic, dev, boot, recs, now)
        else:
            self._records(topic, dev, boot, recs, now)

    def _readings_fast(self, topic, dev, h, payload, now):
        """h: batch.head()'s tuple; src, payload and off are what batch.columns() and batch.aggs()
        read the readings from."""
        boot, base, base_t, n, off, src, toffs, fl, tmin, tmax, ordered = h
        # wire.check_event_time of every reading is None iff these two hold (tmin <= t <= tmax)
        clean = not fl & _UNSYNCED and tmin >= _MIN_TIME_MS and tmax <= now + self.max_future
        res = self.dedup.mark_run(dev, boot, base, n) if clean else None
        out = self.out
        out.touched.add((dev, boot))
        if res is None:  # mixed duplicates, bad times or unsynced records: one by one
            if toffs is None:
                toffs = batch.scan(payload, off, n)[1]
            chans, flags, vals = batch.columns(src, payload, off, 0, n)
            recs = list(zip(range(base, base + n), map(base_t.__add__, toffs), chans, flags, vals))
            self._readings(topic, dev, boot, recs, now)
            return
        d = self.devices.touch(dev)
        d.last_seen = now
        if res == DUP:
            self._count_dup(d, dev, boot, base, base + n - 1, n, now)
            return
        d.received += n
        self.stats.readings += n
        out.records += n
        self._count_live(d, dev, boot, base, base + n - 1, n, now)
        if self.retain:
            if toffs is None:
                toffs = batch.scan(payload, off, n)[1]
            chans, flags, vals = batch.columns(src, payload, off, 0, n)
            raw = out.readings
            out.reading_spans.append((dev, boot, base, base + n - 1, tmin, tmax, len(raw) // RAW_COLS, n))
            raw += batch.raw_rows(dev, boot, base, base_t, toffs, chans, flags, vals)
        wms = self.watermarks
        wm_d = wms.device_wm(dev)
        gwm = wms.global_wm
        dw = self.dev_windows
        start = tmin - (tmin - dw.offset) % dw.size
        last = start + dw.size - 1
        gmap = self._groups_of(dev)
        if tmax <= last and (wm_d is None or wm_d < last) and (not gmap or gwm is None or gwm < last):
            # One window, not due at any record (watermarks stay below tmax - delay < last):
            # adding the batch at once equals adding it record by record. Aggregate per channel
            # in C loops.
            self._add_run(dev, start, src, payload, off, 0, n, wm_d, gwm, gmap)
            ceil = tmax - wms.delay
            if not (dw.due_after(dev, ceil) and self.group_windows.due_after(None, ceil)):
                if toffs is None:
                    toffs = batch.scan(payload, off, n)[1]
                wm_d = self._step_through(dev, base_t, toffs, wm_d, now)
            self._observe(dev, tmax, wm_d, now)
        elif ordered:
            if toffs is None:
                toffs = batch.scan(payload, off, n)[1]
            self._window_runs(dev, boot, base, base_t, toffs, src, payload, off, d, now, gmap)
        else:
            if toffs is None:
                toffs = batch.scan(payload, off, n)[1]
            chans, _flags, vals = batch.columns(src, payload, off, 0, n)
            self._window_seq(dev, boot, zip(range(base, base + n), map(base_t.__add__, toffs), chans, vals), d, now)

    def _add_run(self, dev, start, src, payload, off, i, j, wm_d, gwm, gmap):
        """Readings i..j-1 of a batch, all in one window that is not due: aggregated per channel
        (batch.aggs: C loops)."""
        if src is None:  # the C loops over the bytes: no guess needed
            aggs = batch.aggs(None, payload, off, i, j, 1)[0]
        else:
            hint = self._nchan.get(dev, 1)
            aggs, nc = batch.aggs(src, payload, off, i, j, hint)
            if nc != hint and len(self._nchan) < 4 * self.max_devices:
                self._nchan[dev] = nc
        self.dev_windows.add_aggs(dev, start, aggs, wm_d)
        if gmap:
            gw = self.group_windows
            for a in aggs:
                for name in gmap.get(a[0], ()):
                    gw.add_agg(name, a[0], start, *a[1:], gwm)

    def _window_runs(self, dev, boot, base, base_t, toffs, src, payload, poff, d, now, gmap):
        """A time-ordered batch that spans windows or makes some due: cut into runs that end where
        the window changes or at the record whose watermark makes any window due (it fires right
        after that record, as record by record). A run into a window not due is one aggregate;
        any other run goes record by record. Same results as _window_seq, in fewer steps."""
        wms, dw, gw = self.watermarks, self.dev_windows, self.group_windows
        size, off, delay = dw.size, dw.offset, wms.delay
        n = len(toffs)
        i = 0
        while i < n:
            t = base_t + toffs[i]
            start = t - (t - off) % size
            last = start + size - 1
            j = bisect_left(toffs, last + 1 - base_t, i)  # past this window's records
            k = dw.keys.get(dev)
            due = k.due if k is not None else None
            for g in gw.keys.values():
                if g.due is not None and (due is None or g.due < due):
                    due = g.due
            if due is not None:
                j = min(j, bisect_left(toffs, due + delay - base_t, i) + 1)
            wm_d = wms.device_wm(dev)
            gwm = wms.global_wm
            if (wm_d is None or wm_d < last) and (not gmap or gwm is None or gwm < last):
                self._add_run(dev, start, src, payload, poff, i, j, wm_d, gwm, gmap)
                self._observe(dev, base_t + toffs[j - 1], wm_d, now)
            else:
                chans, _flags, vals = batch.columns(src, payload, poff, i, j)
                self._window_seq(dev, boot, zip(range(base + i, base + j), map(base_t.__add__, toffs[i:j]),
                                                chans, vals), d, now)
            i = j

    def _step_through(self, dev, base_t, toffs, wm_d, now):
        """Older windows become due while the watermark moves through a batch: fire them at
        the record that makes them due, with the watermark of that moment (per-record
        semantics), not at the end of the batch."""
        wms, dw, gw = self.watermarks, self.dev_windows, self.group_windows
        delay = wms.delay
        maxt = None if wm_d is None else wm_d + delay
        for off in toffs:
            t = base_t + off
            if maxt is not None and t <= maxt:
                continue
            maxt = t
            w = t - delay
            if not (dw.due_after(dev, w) and gw.due_after(None, w)):
                wm_d = self._observe(dev, t, wm_d, now)
        return wm_d

    def _readings(self, topic, dev, boot, recs, now):
        """Readings one at a time: (seq, t, channel, flags, value)."""
        d = self.devices.touch(dev)
        d.last_seen = now
        out = self.out
        out.touched.add((dev, boot))
        mark = self.dedup.mark
        good = []
        st = self.stats
        k0 = len(out.readings)
        for rec in recs:
            seq, t, ch, fl, v = rec
            if not self._fresh(d, dev, boot, seq, mark(dev, boot, seq), now):
                continue
            d.received += 1
            out.records += 1
            self._count_live(d, dev, boot, seq, seq, 1, now)
            if fl & _UNSYNCED:
                if not 0 <= t <= MAX_UNSYNCED_MS:
                    self._quarantine(topic, dev, "bad_unsynced_time", "reading t=%d" % t, None, now, boot, seq)
                    continue
                out.unsynced.append((dev, boot, seq, t, "reading", ch, fl, v))
                d.unsynced += 1
                st.unsynced += 1
                continue
            why = wire.check_event_time(t, now, self.max_future)
            if why:
                self._quarantine(topic, dev, why, "reading t=%d ch=%d v=%d" % (t, ch, v), None, now, boot, seq)
                continue
            st.readings += 1
            good.append((seq, t, ch, v))
            if self.retain:
                out.readings += (dev, boot, seq, t, ch, fl, v)
        if len(out.readings) > k0:  # the span of the rows this message added (store.py)
            seqs = out.readings[k0 + 2::RAW_COLS]
            ts = out.readings[k0 + 3::RAW_COLS]
            out.reading_spans.append((dev, boot, min(seqs), max(seqs), min(ts), max(ts), k0 // RAW_COLS, len(seqs)))
        if good:
            self._window_seq(dev, boot, good, d, now)

    def _window_seq(self, dev, boot, recs, d, now):
        """Add (seq, t, channel, value) in order, each judged against the watermarks as they
        stand after the records before it (Flink's per-record watermark): window results,
        revisions and the late split do not depend on how records were batched.

        The device watermark w is tracked here record by record; the watermark state is
        brought up to it (_observe: heap, global watermark, firing) only when that can
        change something: w reaches a window's due point (device or group), or a group record
        falls into a window the global watermark (which can only have moved up to w) may have
        reached: amended and late rows carry the watermark itself."""
        dw, gw = self.dev_windows, self.group_windows
        wms = self.watermarks
        delay = wms.delay
        gmap = self._groups_of(dev)
        late = self.out.late
        dkeys, gkeys = dw.keys, gw.keys
        wm_d = wms.device_wm(dev)  # as the watermark state has it
        w = wm_d  # exact, after the records so far
        maxt = None if wm_d is None else wm_d + delay
        seen = False
        for seq, t, ch, v in recs:
            if dw.add(dev, ch, t, v, w) == LATE:
                late.append((dev, boot, seq, t, ch, v, "device", dev, dw.start_of(t), w, "beyond_allowed_lateness"))
                d.late += 1
                self.stats.late += 1
            names = gmap.get(ch)
            if names:
                gwm = wms.global_wm
                if w != wm_d and (gwm is None or w > gwm) and (gwm is None or gw.start_of(t) + gw.size - 1 <= w):
                    # the record may amend or be late, rows that carry the watermark: make it exact
                    wm_d = self._observe(dev, maxt, wm_d, now)
                    gwm = wms.global_wm
                for name in names:
                    if gw.add(name, ch, t, v, gwm) == LATE:
                        late.append((dev, boot, seq, t, ch, v, "group", name, gw.start_of(t), gwm,
                                     "beyond_allowed_lateness"))
                        d.late += 1
                        self.stats.late += 1
            if maxt is None or t > maxt:  # the watermark moves: what it makes due fires before the next record
                maxt = t
                w = t - delay
                k = dkeys.get(dev)
                if wm_d is None or (k is not None and k.due is not None and w >= k.due) or \
                        (gkeys and not gw.due_after(None, w)):
                    wm_d = self._observe(dev, t, wm_d, now)
            seen = True
        if seen:
            self._observe(dev, maxt, wm_d, now)  # the state catches up; activity (idle timeout, rejoin)

    def _observe(self, dev, maxt, wm_before, now):
        """Event time maxt seen from dev: advance its watermark, fire what is due. Returns the
        device watermark."""
        wm = self.watermarks.observe(dev, maxt, now)
        if wm != wm_before:
            self.dev_windows.advance(dev, wm)
        if self.watermarks.global_wm != self._group_wm:
            self._advance_groups()
        return wm

    def _advance_groups(self):
        g = self.watermarks.global_wm
        if g is not None and g != self._group_wm:
            self._group_wm = g
            self.group_windows.advance_all(g)

    def _groups_of(self, dev):
        """{channel: (group names)} for a device."""
        m = self._groups_cache.get(dev)
        if m is None:
            m = {}
            for g in self.groups:
                if g.matches(dev):
                    m.setdefault(g.channel, []).append(g.name)
            m = self._groups_cache[dev] = {ch: tuple(v) for ch, v in m.items()}
        return m

    @staticmethod
    def _backlog_of(d, boot, first, last, n):
        """How many of n records (seqs first..last of boot) are backlog, not live (admission.py)."""
        bk = d.backlog_count(boot, first, last, n)
        if bk < 0:  # run straddles next_seq
            bk = max(0, min(last, d.hello_next_seq - 1) - first + 1)
        return bk

    def _fresh(self, d, dev, boot, seq, verdict, now):
        """True if the dedup verdict says the record is new; duplicates and records beyond
        the dedup window (the device resends them) are counted here."""
        if verdict == DUP:
            self._count_dup(d, dev, boot, seq, seq, 1, now)
            return False
        if verdict == BEYOND:
            d.deferred += 1
            self.stats.deferred += 1
            return False
        return True

    def _count_dup(self, d, dev, boot, first, last, n, now):
        """Duplicates: counted, and resent backlog still shows the replayer's progress."""
        d.duplicates += n
        self.stats.duplicates += n
        self.admission.heard(dev)
        bk = self._backlog_of(d, boot, first, last, n)
        if bk:
            self.admission.backlog_received(dev, bk, now)

    def _count_live(self, d, dev, boot, first, last, n, now):
        """Split n new records (seqs first..last of boot) into live and backlog (see admission.py)."""
        self.admission.heard(dev)
        bk = self._backlog_of(d, boot, first, last, n)
        if bk:
            d.backlog_received += bk
            self.stats.backlog += bk
            self.admission.backlog_received(dev, bk, now)
        d.live += n - bk
        self.stats.live += n - bk
