"""A long outage on the real LittleFS (littlefs-python, configured like MicroPython's ESP32 flash
filesystem: tools/lfsfs.py). Short variant of tools/outage_week.py (which runs 7 days and prints
the figures in docs/firmware.md): 48 simulated hours without acks at the default config, one CEP
alert an hour, so the outbox fills, drops raw readings, then window summaries, and its gap
records merge (they plateau near 500 after ~36 h). Files, flash blocks, segments in the RAM index and gap records stay under fixed
bounds, alerts are all kept, sampling never stops, the whole flash takes a bounded number of
erases a day, and the next boot loads the same records."""
import pytest

pytest.importorskip("littlefs")

from tools import outage_week  # noqa: E402

MAX_BYTES = 262144
SEG = 8192


@pytest.fixture(scope="module")
def outage():
    lines = []
    rows, res = outage_week.run(days=48 / 24.0, every_h=4, out=lines.append, alert_every_s=3600)
    return rows, res, lines


def test_files_blocks_index_stay_bounded(outage):
    rows, res, lines = outage
    for r in rows:
        assert r["files"] <= MAX_BYTES // SEG + 4, lines
        assert r["segs"] <= MAX_BYTES // SEG + 4, lines  # the RAM index: one entry per file
        assert r["blocks"] <= 100, lines  # of 512 (2 MiB)
        assert r["bytes"] <= MAX_BYTES + 1024, lines
        assert r["errors"] == 0 and r["write_errors"] == 0, lines


def test_gap_records_merge_and_stay_bounded(outage):
    rows, res, lines = outage
    gaps = [r["gaps"] for r in rows]
    assert max(gaps) <= 640, lines  # ranges break only at kept windows; merged when windows go (7 days: <= 573)
    assert any(b < a for a, b in zip(gaps, gaps[1:])), lines  # merged, not only piled up
    assert rows[-1]["dropped"] > 100000


def test_alerts_kept_and_sampling_never_stops(outage):
    rows, res, lines = outage
    assert res["samples"] == res["expected_samples"]
    assert rows[-1]["alerts"] == 48  # one an hour, none dropped while raw and windows can go


def test_next_boot_loads_what_was_stored(outage):
    rows, res, lines = outage
    assert res["reboot_torn"] == 0
    assert res["reboot_segs"] <= MAX_BYTES // SEG + 4
    assert res["reboot_records"] == rows[-1]["stored"]


def test_full_outbox_flash_wear_is_bounded(outage):
    # compacting continuously cost 112,806 erases/day (a synced append per gap record); now about
    # 6,300/day, near normal operation (docs/firmware.md "Flash life")
    rows, res, lines = outage
    assert res["erases_per_day"] < 10000, (res, lines)


def test_live_and_backlog_frames_on_real_littlefs():
    # take_live reads each live batch back from the segment file that is still open for
    # appending (one littlefs handle writes, another reads after the sync); read_backlog reads
    # the same frames after a rewind; segments roll over and acks trim in between
    from tools.lfsfs import LfsFS
    from firmware.outbox import Outbox
    from firmware.obframe import records
    from shared import wire_dev as wire
    fs = LfsFS()
    ob = Outbox(fs, 3, seg_bytes=600, batch_records=8).load()
    ob.begin_session()
    tb = [0x0000, 0x019B, 0x6A8C, 0x0000]  # an epoch ms as u16 limbs (firmware.clock.tb)
    live = []
    for i in range(100):
        ob.reading_at(i % 3, i * 7 - 300, tb, 0, 1000 * i)
        if i % 17 == 0:
            ob.append(wire.KIND_WINDOW, 1000 * i, 0, (0, 60000, 60, -5, 5, 0, 2, 0, 59000))
        live.extend(records(ob.take_live()))
        if i == 60:
            ob.on_ack(3, 20)
    ob.flush()
    live.extend(records(ob.take_live()))
    assert not ob.need_rewind
    assert [r[1] for r in live] == list(range(ob.seq))
    t0 = (tb[1] << 32) | (tb[2] << 16)
    for r in live:
        if r[3] == wire.KIND_READING:
            assert r[2] - t0 == 1000 * (r[5][1] + 300) // 7 and r[5][0] == (r[5][1] + 300) // 7 % 3, r
    ob.rewind()
    back = []
    while ob.has_backlog():
        back.extend(records(ob.read_backlog(9)))
    assert back == [r for r in live if r[1] > 20]
