"""Reconnect storm: the admission clock must not stop while a commit is in flight.

The timer loop used to await each periodic checkpoint, which waits for the commit in flight:
with 200-300 ms commits under load the admission ticked ~4 times a second instead of 20,
and a 10,000-device storm drained with a full token bucket and every replay slot free
(tools/bench_storm.py's progress lines: active 0, tokens 75,000, thousands waiting)."""
import asyncio
import os
import re

import pytest

from gateway.service import Gateway
from tools import bench_gateway as bg
from tools.bench_compare import MemIngest


def test_admission_ticks_and_grants_go_on_while_a_commit_is_in_flight(tmp_path):
    msgs = bg.workload(2, 4, 50)  # a few data messages: something to commit
    cfg = bg.gateway_cfg(1883, os.path.join(str(tmp_path), "gw.db"), "NORMAL")
    cfg["web"] = {"port": 0}

    async def go():
        gw = Gateway(cfg, ingest_factory=lambda c, s: MemIngest(msgs, c, s))
        entered, release = asyncio.Event(), asyncio.Event()
        real_commit = gw.store.commit

        async def held_commit(writes):
            entered.set()
            await release.wait()  # a commit that takes as long as the test wants
            return await real_commit(writes)

        gw.store.commit = held_commit
        ticks = [0]
        real_tick = gw.admission.tick

        def counted_tick(now, paused=False):
            ticks[0] += 1
            return real_tick(now, paused)

        gw.admission.tick = counted_tick
        task = asyncio.ensure_future(gw.run())
        try:
            await asyncio.wait_for(entered.wait(), 20)
            at_commit = ticks[0]
            for _ in range(400):  # bounded: 20 s; the timer ticks every 50 ms
                if ticks[0] >= at_commit + 5 or task.done():
                    break
                await asyncio.sleep(0.05)
            during = ticks[0] - at_commit
            release.set()
            for _ in range(400):
                if gw.stats.readings == 4 * 50 and gw.stats.checkpoints >= 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            release.set()
            gw.stop()
            await asyncio.wait_for(task, 30)
        return during, gw

    during, gw = asyncio.run(go())
    assert during >= 5, "admission ticked %d times while a commit was in flight" % during
    assert gw.stats.readings == 4 * 50 and gw.stats.checkpoint_failures == 0


@pytest.mark.broker
def test_bench_storm_short_run_is_exact_and_prints_the_median_of_its_rounds(tmp_path, capsys):
    """The short variant of tools/bench_storm.py: steady phases before and after, a small storm
    through the real mosquitto and gateway processes, every record exactly once; two rounds,
    each in a fresh process with its own broker, gateway and database, and their median."""
    from tools import bench_storm
    rc = bench_storm.main(["--devices", "150", "--backlog", "60", "--jitter-s", "1", "--steady-devices", "5",
                           "--steady-readings", "5000", "--insecure", "--timeout", "120", "--stall-s", "30",
                           "--dir", str(tmp_path / "storm"), "--rounds", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("RESULT: OK (0 lost, 0 duplicated)") == 2 and out.count("storm / steady (goal >= 0.8):") == 2
    assert out.count("5 connected devices x 1000 live readings: 5000 committed") == 4
    assert sorted(os.listdir(tmp_path / "storm")) == ["round-1", "round-2"]
    summary = [x for x in out.splitlines() if x.startswith("rounds: 2;")]
    assert len(summary) == 1 and summary[0].endswith("rounds with 0 lost and 0 duplicated: 2 of 2"), out
    walls = re.search(r"by wall clock: ([0-9.]+) ([0-9.]+) -> median ([0-9.]+);", summary[0])
    assert walls, summary[0]
    a, b, m = map(float, walls.groups())
    assert m == pytest.approx((a + b) / 2, abs=0.006)


def test_bench_storm_rounds_summary_takes_the_median_and_counts_a_round_without_a_ratio_as_missing():
    from tools import bench_storm
    line = bench_storm.rounds_summary([0.79, 0.91, 0.85], [0.8, 0.9, 0.95], 3, 3)
    assert "by wall clock: 0.79 0.91 0.85 -> median 0.85;" in line
    assert "by gateway CPU per reading: 0.80 0.90 0.95 -> median 0.90;" in line
    # a round that failed before its ratio: two ratios, median of those, and 1 of 3 not exact
    line = bench_storm.rounds_summary([0.7, 0.9], [0.8, 0.9], 2, 3)
    assert "0.70 0.90 -> median 0.80;" in line and "rounds with 0 lost and 0 duplicated: 2 of 3" in line
    assert "by wall clock: none" in bench_storm.rounds_summary([], [], 0, 2)
    assert bench_storm._RATIO.search(
        "storm / steady (goal >= 0.8): 0.79 by wall clock (226855 / 286089 readings/s, steady before and after: "
        "288424 283754), 0.82 by gateway CPU per reading (4.16 / 3.43 us; event loop 2.05 / 1.64)").groups() == \
        ("0.79", "0.82")


def test_bench_storm_prints_no_cpu_ratio_from_phases_shorter_than_its_clock_resolution():
    """/proc counts CPU in 10 ms ticks: a tiny run's steady phase measured 0 s and the bench
    printed a CPU ratio of 0.00."""
    from tools import bench_storm
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    assert bench_storm.cpu_ratio([0.0, 0.5, 0.4], 4e-6, 5e-6) == "n/a"
    assert bench_storm.cpu_ratio([(bench_storm.MIN_CPU_TICKS - 1) * tick, 5.0, 5.0], 4e-6, 5e-6) == "n/a"
    assert bench_storm.cpu_ratio([7.0, 30.0, 7.2], 4e-6, 5e-6) == "0.80"
    assert bench_storm.cpu_ratio([7.0, 30.0, 7.2], 4e-6, 0) == "n/a"
    m = bench_storm._RATIO.search("storm / steady (goal >= 0.8): 0.24 by wall clock (1 / 4 readings/s, steady "
                                  "before and after: 4 4), n/a by gateway CPU per reading (1.00 / 0.00 us; ...)")
    assert m.groups() == ("0.24", "n/a")


def test_bench_storm_encodes_exactly_what_the_wire_contract_does():
    """The replayers build a message's pack from cached columns and slices (tools/bench_storm.py):
    every batch size, seq and device index must give wire.encode_readings' bytes, also past the
    cached value table's first size (k > 50)."""
    import random
    from shared import wire
    from tools import bench_storm
    rnd = random.Random(16)
    t_base = bench_storm.NOW - 720000
    for k in (1, 2, 3, 49, 50, 51, 137, 300):
        for _ in range(40):
            idx, s0 = rnd.randrange(0, 10200), rnd.randrange(0, 20000)
            dev = "s%05d" % idx
            assert bench_storm.encode_batch(dev, idx, t_base, s0, k) == \
                wire.encode_readings(dev, 1, bench_storm._rows(idx, t_base, s0, k)), (idx, s0, k)


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no scheduler autogroups (Linux only)")
def test_replayer_nice_lowers_the_benchs_autogroup_not_only_its_process_nice():
    """With autogroups on, the CPU is shared between sessions first: a process nice alone does not
    lower the replayers against the gateway and the broker (their own sessions). The bench's
    --replayer-nice sets its session's autogroup nice; a session of its own, so the caller's
    session keeps its share."""
    import subprocess
    import sys
    from tools import bench_storm
    with open("/proc/self/autogroup") as f:
        mine = f.read()
    code = ("import sys; sys.path.insert(0, %r); from tools import bench_storm as b; print(b._lower_priority(3))"
            % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], start_new_session=True, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    if bench_storm._autogroups():
        assert out.stdout.strip().startswith("autogroup ") and out.stdout.strip().endswith(" nice 3"), out.stdout
    else:
        assert "process nice" in out.stdout, out.stdout
    with open("/proc/self/autogroup") as f:
        assert f.read() == mine  # the test's own session untouched


def test_bench_storm_inproc_sequence_runs_each_phase_after_the_one_before_is_committed(tmp_path, capsys):
    """The short variant of `python tools/bench_storm_inproc.py sequence steady storm steady`:
    one gateway, one database, each phase with devices of its own, queued only once every
    message before it is committed, every reading stored exactly once."""
    import sqlite3
    from tools import bench_storm_inproc as bsi
    res = bsi.sequence(["steady:4x300", "storm:30x120", "steady:4x300"], str(tmp_path))
    out = capsys.readouterr().out
    assert [(name, n) for name, n, _ in res] == [("1 steady 4 x 300", 1200), ("2 storm 30 x 120", 3600),
                                                 ("3 steady 4 x 300", 1200)]
    for name, n, (cpu, loop_cpu, sql_cpu, wrote, wall, ckpts, _ckpt_s) in res:
        assert cpu > 0 and loop_cpu > 0 and sql_cpu > 0 and wrote > 0 and wall > 0 and ckpts >= 1, name
        assert "phase %s = %d readings:" % (name, n) in out
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    try:
        rows = db.execute("SELECT substr(device, 1, 3), count(*), count(DISTINCT device || ' ' || boot || ' ' || seq) "
                          "FROM readings GROUP BY 1 ORDER BY 1").fetchall()
    finally:
        db.close()
    assert rows == [("l0-", 1200, 1200), ("l2-", 1200, 1200), ("s1-", 3600, 3600)]


def test_bench_storm_inproc_refuses_figures_of_a_phase_the_gateway_quarantined(tmp_path):
    """More devices than the gateway's limit are quarantined (too_many_devices), which costs
    next to nothing: the harness must stop instead of printing such a phase as cheap."""
    import asyncio
    from tools import bench_storm_inproc as bsi
    cfg = bsi.config(str(tmp_path))
    cfg["limits"]["max_devices"] = 2
    phases = [("storm 3 x 50", bsi.workload("storm", 3, 50, prefix="q0-"), 150)]
    with pytest.raises(SystemExit, match="quarantined"):
        asyncio.run(bsi._run_phases(cfg, phases))
