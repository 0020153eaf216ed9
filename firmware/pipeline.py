# The edge pipeline: ring buffer -> tumbling windows -> CEP rules -> anomaly detectors.
#
#   p = Pipeline(config, emit)        emit(kind, t_ms, flags, body): one window/cep/anomaly record
#   p.set_base(base_ms, synced)       epoch ms (synced) or boot ms (unsynced) at relative time 0
#   p.sample(ch, value_fixed, t_rel)  per sample; t_rel = small-int ms since the base
#   p.tick(t_rel)                     periodic: closes due windows, checks absence rules
#   p.flush(t_rel)                    closes every open window (shutdown, clock sync)
#   p.rebase(new_base_ms)             move the origin (the app calls it before t_rel nears 2**29)
#
# The per-sample path never touches epoch ms (a long int on MicroPython) and allocates
# nothing in steady state; emits convert to absolute ms (allocation is fine there: rare).
# Config format, time rules and figures: docs/pipeline.md.
from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
from firmware.hal import unload

__all__ = ("Pipeline", "ConfigError")


class ConfigError(ValueError):
    """A bad pipeline config: .rule_id names the rule (or section), .reason says why."""

    def __init__(self, rule_id, reason):
        super().__init__("%s: %s" % (rule_id, reason))
        self.rule_id = rule_id
        self.reason = reason


class Pipeline:
    """On-device stream processing for every configured channel. See module comment."""

    def __init__(self, config, emit):
        self.emit = emit
        # config parsing lives in firmware.pconf: the board unloads it after boot (RAM)
        from firmware.pconf import setup
        setup(self, config)
        self.base_ms = 0
        self.synced = False
        self.flags = wire.FLAG_UNSYNCED
        self.late = 0  # samples older than their channel's open window: not in a device window
        self.unknown = 0  # samples on a channel the config does not name
        self.emitted = 0
        self.set_base(0, False)

    # ------------------------------------------------------------ time

    def set_base(self, base_ms, synced, shift_ms=0):
        """New meaning of relative time 0: epoch ms (synced) or boot ms (unsynced). Open windows
        close first, under the old base and flags; shift_ms: how far the relative origin itself
        moves (firmware/pconf.py, rarely run: unloaded after)."""
        _conf("set_base", self, "firmware.pconf", base_ms, synced, shift_ms)

    def rebase(self, new_base_ms):
        """Same clock, new origin (pconf.rebase); call it before relative times reach 2**29 ms."""
        _conf("rebase", self, "firmware.pconf", new_base_ms)

    # ------------------------------------------------------------ per sample

    def sample(self, ch, v, t):
        """One sample: channel number, fixed-point value (x1000), t = ms since the base."""
        if ch < 0 or ch >= self.nch or not self.known[ch]:
            self.unknown += 1
            return
        r = self.rings[ch]
        if r is not None:
            r.push(t, v)
        if self.windows[ch].add(v, t):
            self.late += 1
        cw = self.cwindows[ch]
        if cw is not None:
            cw.add(v, t)
        for r in self.by_ch[ch]:
            r.sample(ch, v, t)
        for r in self.absence:
            r.check(t)
        for d in self.det_by_ch[ch]:
            d.sample(v, t)

    def tick(self, t):
        """Periodic call (e.g. once per sampling round): due windows close, absence is checked."""
        for w in self.windows:
            if w is not None:
                w.tick(t)
        for r in self.absence:
            r.check(t)

    def flush(self, t=None):
        """Close every open window, time and count (shutdown, before a clock change)."""
        self.close_windows()

    def close_windows(self):
        for n in range(self.nch):
            if self.known[n]:
                self.windows[n].close()
                if self.cwindows[n] is not None:
                    self.cwindows[n].close()

    # ------------------------------------------------------------ sinks (emits: may allocate)

    def on_window(self, w):
        a = w.agg
        n, mn, mx, mean, std = a.result()
        self._emit(wire.KIND_WINDOW, w.start,
                   (w.ch, w.size, n, mn, mx, mean, std, a.t0 - w.start, a.t1 - w.start))

    # (short parameter names: each name is a qstr on the board, RAM)
    def on_count_window(self, w):
        a = w.agg
        n, mn, mx, mean, std = a.result()
        # size_ms 0 marks a count window; t is its first sample.
        self._emit(wire.KIND_WINDOW, a.t0, (w.ch, 0, n, mn, mx, mean, std, 0, a.t1 - a.t0))

    def on_cep(self, r, t, span, evidence):
        """A CEP rule r matched."""
        self._emit(wire.KIND_CEP, t, (r.id, r.severity, span, evidence))

    def on_anomaly(self, d, t, body):
        """Detector d alerted."""
        self._emit(wire.KIND_ANOMALY, t, body)

    def _emit(self, kind, t, body):
        self.emitted += 1
        self.emit(kind, self.base_ms + t, self.flags, body)

    # ------------------------------------------------------------ status (firmware/pconf.py)

    def stats(self):
        """Counters for the status record and the console (allocates: not per sample)."""
        return _conf("stats", self, "firmware.prules")

    def latest(self, ch):
        """(t_rel, value) of the newest sample of a channel (needs a ring), or None."""
        return _conf("latest", self, "firmware.prules", ch)


def _conf(name, pipeline, module, *a):
    # rarely run pipeline code lives in firmware/pconf.py (with the config parsing) or
    # firmware/prules.py: loaded for the call, unloaded after on MicroPython (RAM)
    m = __import__(module, None, None, ("x",))
    try:
        return getattr(m, name)(pipeline, *a)
    finally:
        unload(module)
        unload("firmware.pconf")  # prules imports it
