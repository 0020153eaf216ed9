# Event time on the device: the ticks-to-epoch mapping of this boot.
#
# boot_ms(): ms since boot, built from wrapping ticks (call it at least once per ticks period,
# 2**30 ms ~ 12.4 days; the app's tasks call it every second). It is kept as two small ints,
# ms_hi * 2**28 + ms_lo, so update() (the per-sample path) never makes a long int; tb / tfl are
# the per-sample time base: stamp_now() == (tb as an i64 + ms_lo, tfl).
# boot_epoch: epoch ms at boot_ms == 0, known after the first NTP answer or gateway time beacon.
# Records taken before that carry FLAG_UNSYNCED and t = boot ms; stamp() converts records of the
# CURRENT boot to epoch at send time. Records of earlier boots that never synced stay flagged:
# their boot's epoch is unknowable, so they are never stamped wrong.
#
# Sources: NTP when reachable (preferred); else the gateway's ack time beacon. A later reference
# only measures the offset (offset_ms = our estimate - reference) unless it differs by more than
# max_step_ms, then the mapping steps. A beacon never overrides an NTP mapping of this boot.
from array import array

from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)

try:
    from micropython import const
except ImportError:  # CPython
    from firmware.cpyticks import const

_I32_MAX = const(2147483647)
_HI = const(1 << 28)  # boot ms = ms_hi * 2**28 + ms_lo: both stay small ints (no heap on MicroPython)


class Clock:
    def __init__(self, hal, boot, max_step_ms=1000, use_beacon=True):
        self.hal = hal
        self.boot = boot
        self.max_step_ms = max_step_ms
        self.use_beacon = use_beacon
        self._last = ms = hal.ticks_ms()  # ticks start at 0 at reset: ms since boot
        self.ms_hi = ms // _HI
        self.ms_lo = ms % _HI
        # time base of the per-sample path: t = tb (4 big-endian u16 limbs of an i64) + ms_lo,
        # with flags tfl; kept equal to stamp_now() by update() (see firmware/outbox.py)
        self.tb = array("H", [0, 0, 0, 0])
        self.tfl = wire.FLAG_UNSYNCED
        self._tb_e = self._tb_hi = -1
        self.boot_epoch = self.source = None
        self.offset_ms = self.steps = 0

    def update(self):
        """Advance ms_hi / ms_lo from the ticks and keep tb / tfl current. The per-sample
        path: allocates nothing unless the time base changes (sync, step, every 2**28 ms)."""
        hal = self.hal
        now = hal.ticks_ms()
        d = hal.ticks_diff(now, self._last)
        if d > 0:
            lo = self.ms_lo + d
            if lo >= _HI:
                self.ms_hi += lo // _HI
                lo = lo % _HI
            self.ms_lo = lo
            self._last = now
        e = self.boot_epoch
        if e is self._tb_e and self.ms_hi == self._tb_hi:
            return
        base = self.ms_hi * _HI
        if e is None:
            self.tfl = wire.FLAG_UNSYNCED
        else:
            base += e
            self.tfl = 0
        base &= 0xFFFFFFFFFFFFFFFF
        tb = self.tb
        tb[0] = (base >> 48) & 0xFFFF
        tb[1] = (base >> 32) & 0xFFFF
        tb[2] = (base >> 16) & 0xFFFF
        tb[3] = base & 0xFFFF
        self._tb_e = e
        self._tb_hi = self.ms_hi

    def boot_ms(self):
        self.update()
        return self.ms_hi * _HI + self.ms_lo

    @property
    def synced(self):
        return self.boot_epoch is not None

    def now(self):
        """Epoch ms now, or None before the first sync."""
        if self.boot_epoch is None:
            return None
        return self.boot_epoch + self.boot_ms()

    def stamp_now(self):
        """(t, flags) for a record made now: epoch if synced, else boot ms + FLAG_UNSYNCED."""
        b = self.boot_ms()
        if self.boot_epoch is None:
            return b, wire.FLAG_UNSYNCED
        return self.boot_epoch + b, 0

    def set_time(self, epoch_ms, source, at_boot_ms=None):
        """A reference time (source 'ntp' or 'gw') valid at at_boot_ms (default now).
        Returns True when the mapping was set or stepped."""
        if epoch_ms is None or epoch_ms < wire.MIN_TIME_MS:
            return False
        if source == "gw" and not self.use_beacon:
            return False
        b = self.boot_ms() if at_boot_ms is None else at_boot_ms
        new = epoch_ms - b
        if self.boot_epoch is None:
            self.boot_epoch = new
            self.source = source
            self.offset_ms = 0
            return True
        off = self.boot_epoch - new
        if off > _I32_MAX:
            off = _I32_MAX
        elif off < -_I32_MAX:
            off = -_I32_MAX
        self.offset_ms = off
        if source == "gw" and self.source == "ntp":
            return False
        if off > self.max_step_ms or off < -self.max_step_ms or (source == "ntp" and self.source != "ntp"):
            self.boot_epoch = new
            self.source = source
            self.steps += 1
            return True
        return False

    def stamp(self, boot, t, flags):
        """Send-time conversion: (t, flags) of a stored record as it goes on the wire."""
        if flags & wire.FLAG_UNSYNCED and boot == self.boot and self.boot_epoch is not None:
            return self.boot_epoch + t, flags & ~wire.FLAG_UNSYNCED
        return t, flags
