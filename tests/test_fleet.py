"""Fleet simulator and ground-truth checker: the truth is exactly what flash holds, and the
checker catches every kind of difference (a checker that never fails proves nothing)."""
import asyncio
import io
import shutil
import sqlite3

import pytest

from firmware import obframe as _outbox
from tools import groundtruth
from tools.broker import free_port
from tools.fleet import Fleet, Site, parse_faults, random_faults
from tests.conftest import Broker, mosquitto_bin


def _flash_records(dev):
    out = set()
    for path, data in dev.mem.files.items():
        if path.startswith("ob/s"):
            bio = io.BytesIO(bytes(data))
            while True:
                r = _outbox.read_frame(bio)
                if r is None:
                    break
                out.add((dev.id, r[1][0], r[1][1]))
    return out


def test_truth_is_exactly_what_reached_flash_across_torn_writes(tmp_path):
    """Offline devices (no broker, nothing acked, nothing trimmed): after reboots, power cuts
    and cuts in the middle of flash writes, the recorded truth equals what the devices' own
    scan finds on flash, record for record."""
    truth = str(tmp_path / "truth.db")

    async def main():
        fleet = Fleet(3, free_port(), truth, seed=3, sample_ms=20)
        for d in fleet.devices:
            d.hal.set_wifi(False)
        await fleet.start(stagger_s=0)
        await asyncio.sleep(0.6)
        for _ in range(3):
            await fleet.torn_write(fleet.devices[:2])
            await asyncio.sleep(0.3)
        await fleet.reboot(fleet.devices[2:], kill=True)
        await asyncio.sleep(0.3)
        await fleet.shutdown()
        fleet.truth.close()
        return fleet

    fleet = asyncio.run(asyncio.wait_for(main(), 60))
    assert fleet.errors == []
    assert sum(d.torn_tails for d in fleet.devices) >= 1  # some cut really tore a frame
    db = sqlite3.connect(truth)
    recorded = set(db.execute("SELECT device, boot, seq FROM records"))
    held = set(db.execute("SELECT device, boot, seq FROM held"))
    on_flash = set()
    for d in fleet.devices:
        assert d.boots >= 2
        on_flash |= _flash_records(d)
    assert recorded == on_flash == held
    assert len(recorded) > 100


def test_fault_spec_parsing():
    ev = parse_faults("storm@30+8, outage@10+5:0-4,gwkill@45+3,dup@5+20:0.3")
    assert [(e.kind, e.at, e.dur, e.arg) for e in ev] == [
        ("dup", 5, 20, "0.3"), ("outage", 10, 5, "0-4"), ("storm", 30, 8, None), ("gwkill", 45, 3, None)]
    with pytest.raises(ValueError):
        parse_faults("meteor@3")
    import random
    a = random_faults(6, 60, random.Random(4))
    b = random_faults(6, 60, random.Random(4))
    assert repr(a) == repr(b) and len(a) == 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One short clean run (4 devices, a short outage) shared by the checker tests."""
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed: run the README's set-up command")
    tmp = tmp_path_factory.mktemp("fleetrun")
    broker = Broker(tmp).start()
    site = Site(tmp / "site", broker=broker, window_ms=2000, lateness_ms=2000, ooo_ms=300, idle_ms=3000)
    truth = str(tmp / "truth.db")

    async def main():
        fleet = Fleet(4, site.port, truth, seed=11, sample_ms=100, window_ms=1000, broker=site.mq)
        fleet.truth.meta("windows", site.windows)
        await fleet.start(stagger_s=0.2)
        try:
            await asyncio.sleep(1)
            fleet.wifi(fleet.devices[:1], False)
            await asyncio.sleep(6)
            fleet.wifi(fleet.devices[:1], True)
            await asyncio.sleep(2)
            assert await fleet.quiesce(30)
        finally:
            await fleet.shutdown()
            fleet.truth.close()

    try:
        site.start_gateway()
        asyncio.run(asyncio.wait_for(main(), 90))
        assert site.stop_gateway() == 0
    finally:
        site.close()
    return site, truth


def _tampered(run_dir, tmp_path, sql):
    site, truth = run_dir
    db = str(tmp_path / "copy.db")
    shutil.copy(site.db, db)
    c = sqlite3.connect(db)
    c.executescript(sql)
    c.commit()
    c.close()
    return groundtruth.check(db, [truth], site.windows)


def test_clean_run_checks_ok(run_dir, tmp_path):
    rep = _tampered(run_dir, tmp_path, "")
    assert rep.ok, rep.text()
    assert rep.counts["windows_fired"] > 5 and rep.counts["late_rows"] > 0
    assert groundtruth.main(["--db", run_dir[0].db, "--truth", run_dir[1]]) == 0


@pytest.mark.parametrize("name, sql, category", [
    ("lost reading", "DELETE FROM readings WHERE rowid = (SELECT min(rowid) FROM readings)", "lost"),
    ("lost window summary", "DELETE FROM device_windows WHERE rowid = 3", "lost"),
    ("duplicated reading", "INSERT INTO readings SELECT * FROM readings WHERE rowid = 7", "duplicated"),
    ("value changed", "UPDATE readings SET value = value + 1 WHERE rowid = 9", "value_mismatch"),
    ("time changed", "UPDATE readings SET t = t + 1 WHERE rowid = 11", "time_mismatch"),
    ("record nobody stored", "INSERT INTO readings VALUES ('dev-0000', 1, 999999, 1767225600000, 0, 0, 5)",
     "unexpected"),
    # window_results is rewritten in place (INSERT OR REPLACE), so tamper with a row that exists
    ("window sum off", "UPDATE window_results SET sum = sum + 1 WHERE rowid = (SELECT min(rowid) FROM window_results)",
     "window_mismatch"),
    ("revision's sum off", "UPDATE window_revisions SET sum = sum + 1 WHERE rowid = 1", "window_mismatch"),
    ("revision lost", "DELETE FROM window_revisions WHERE rowid = 1", "window_mismatch"),
    ("window result missing", "DELETE FROM window_results WHERE rowid = 1 AND scope = 'device';"
                              "DELETE FROM open_windows", "window_missing"),
    ("late row that was not late", "UPDATE late SET watermark = window_start WHERE rowid = 1", "late_not_late"),
    ("gap the device never reported", "INSERT INTO gaps VALUES ('dev-0001', 1, 0, 0, 1, 5, 2, 2)",
     "gap_not_reported_by_device"),
])
def test_checker_catches(run_dir, tmp_path, name, sql, category):
    rep = _tampered(run_dir, tmp_path, sql)
    assert not rep.ok, name
    assert category in rep.nerr, (name, rep.text())
    assert "FAILED" in rep.text()
