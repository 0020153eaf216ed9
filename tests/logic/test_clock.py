# Event time: ticks-to-epoch mapping, unsynced records, send-time conversion (firmware/clock.py).
from shared import wire
from firmware.clock import Clock

EPOCH = 1767225600000  # 2026-01-01


class FakeHal:
    def __init__(self):
        self.t = 0

    def ticks_ms(self):
        return self.t & 0x3FFFFFFF

    def ticks_diff(self, a, b):
        return ((a - b + 0x20000000) & 0x3FFFFFFF) - 0x20000000


def test_unsynced_then_synced_and_send_time_conversion():
    h = FakeHal()
    c = Clock(h, boot=7)
    h.t = 1500
    t, fl = c.stamp_now()
    assert (t, fl) == (1500, wire.FLAG_UNSYNCED)
    assert c.now() is None
    # not synced yet: stays flagged at send time
    assert c.stamp(7, t, fl) == (1500, wire.FLAG_UNSYNCED)
    h.t = 5000
    assert c.set_time(EPOCH + 5000, "ntp")
    assert c.boot_epoch == EPOCH and c.synced
    # the early record of THIS boot becomes exact epoch time, flag cleared
    assert c.stamp(7, 1500, wire.FLAG_UNSYNCED) == (EPOCH + 1500, 0)
    # an unsynced record of an EARLIER boot is never stamped
    assert c.stamp(6, 1500, wire.FLAG_UNSYNCED) == (1500, wire.FLAG_UNSYNCED)
    # synced records are stamped at creation and pass through
    h.t = 6000
    t, fl = c.stamp_now()
    assert (t, fl) == (EPOCH + 6000, 0)
    assert c.stamp(7, t, fl) == (t, 0)


def test_ticks_wrap_keeps_boot_ms_growing():
    h = FakeHal()
    c = Clock(h, boot=1)
    step = 1 << 27
    last = 0
    for i in range(20):  # 2.5 ticks periods
        h.t += step
        b = c.boot_ms()
        assert b == last + step
        last = b
    assert last == 20 * step


def test_offset_measured_small_drift_ignored_big_step_applied():
    h = FakeHal()
    c = Clock(h, boot=1, max_step_ms=1000)
    h.t = 10000
    c.set_time(EPOCH + 10000, "gw")
    h.t = 20000
    assert not c.set_time(EPOCH + 20000 - 300, "gw")  # we are 300 ms ahead: measured only
    assert c.offset_ms == 300 and c.boot_epoch == EPOCH
    assert c.set_time(EPOCH + 20000 + 5000, "gw")  # 5 s behind: step
    assert c.offset_ms == -5000 and c.boot_epoch == EPOCH + 5000


def test_ntp_wins_over_beacon_and_bad_times_ignored():
    h = FakeHal()
    c = Clock(h, boot=1)
    h.t = 1000
    assert not c.set_time(1700000000, "gw")  # seconds, not ms: refused
    assert not c.set_time(None, "ntp")
    c.set_time(EPOCH + 1000, "gw")
    assert c.set_time(EPOCH + 1200, "ntp")  # first NTP replaces a beacon mapping
    assert c.source == "ntp"
    assert not c.set_time(EPOCH + 1000 + 60000, "gw")  # beacon never overrides NTP
    assert c.offset_ms == EPOCH + 200 - (EPOCH + 60000)
    c2 = Clock(h, boot=1, use_beacon=False)
    assert not c2.set_time(EPOCH, "gw") and not c2.synced
