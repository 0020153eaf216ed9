"""Metrics people alert on, the shipped alert rules (promtool) and Grafana dashboard, /healthz."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, free_port
from tests.test_gateway_fakes import T0, readings

RULES = os.path.join(ROOT, "deploy", "prometheus", "edgeflow-alerts.yml")
RULE_TESTS = os.path.join(ROOT, "deploy", "prometheus", "edgeflow-alerts.test.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "edgeflow-dashboard.json")
PROMTOOL = shutil.which("promtool")


def _promtool():
    if not PROMTOOL:
        pytest.fail("promtool is not installed: apt-get install prometheus (tools/setup.sh does)")
    return PROMTOOL


def test_promtool_checks_the_alert_rules():
    r = subprocess.run([_promtool(), "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout
    # the rules' own unit tests: they fire on the series they are about, with these labels and texts
    r = subprocess.run([_promtool(), "test", "rules", RULE_TESTS], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_cover_what_the_issue_asks():
    text = open(RULES).read()
    for name in ("HighCommitLatency", "HighAckLatency", "CheckpointFailures", "SustainedBackpressure",
                 "DevicesOffline", "WatermarkStalled", "QuarantineRate"):
        assert "alert: Edgeflow" + name in text


def _metric_names(text):
    """Metric names used in PromQL expressions (edgeflow_* and process_*)."""
    return set(re.findall(r"\b((?:edgeflow_gateway|process)_[a-z_]+)", text))


def test_grafana_dashboard_schema():
    d = json.load(open(DASHBOARD))
    for k, typ in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list), ("time", dict),
                   ("templating", dict), ("refresh", str), ("tags", list), ("version", int)):
        assert isinstance(d.get(k), typ), k
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert d["schemaVersion"] >= 36  # Grafana 9+
    assert {"from", "to"} <= set(d["time"])
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance"} <= names
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for p in d["panels"]:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g) and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        assert p["type"] in ("row", "timeseries", "stat", "gauge", "table", "bargauge")
        if p["type"] == "row":
            continue
        boxes.append((g["x"], g["y"], g["w"], g["h"], p["title"]))
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    for i, a in enumerate(boxes):  # no two panels overlap
        for b in boxes[i + 1:]:
            assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1], (a, b)


def _scrape(url, wait_s=30.0):
    """The endpoint's text; waits for a gateway (a subprocess) still starting."""
    t0 = time.monotonic()
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except urllib.error.URLError:
            if time.monotonic() - t0 > wait_s:
                raise
            time.sleep(0.2)


def _get(url):
    try:
        r = urllib.request.urlopen(url, timeout=5)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.broker
def test_metrics_latency_histograms_and_healthz(broker, tmp_path):
    """A real gateway fed by the fleet simulator: the histograms count what it committed and
    acked, every metric the dashboard and the rules name is exported, and /healthz fails
    while the broker is down."""
    from tests.test_web_browser import FleetThread
    from tools.fleet import Site
    wport, mport = free_port(), free_port()
    site = Site(tmp_path / "site", broker=broker, window_ms=1000, lateness_ms=1000, ooo_ms=300, idle_ms=5000,
                gw_extra={"web": {"port": wport}, "metrics": {"port": mport}})
    fleet = None
    try:
        site.start_broker().start_gateway()
        fleet = FleetThread(site.port, site.mq)
        assert fleet.ready.wait(30) and fleet.error is None, fleet.error
        url = "http://127.0.0.1:%d/metrics" % mport
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and not re.search(r"^edgeflow_gateway_acks_total [1-9]", _scrape(url), re.M):
            time.sleep(0.5)
        time.sleep(3)
        fleet.close()
        fleet = None
        prev = None
        for _ in range(40):  # quiet: the last messages committed
            text = _scrape(url)
            msgs = _value(text, "edgeflow_gateway_messages_total")
            if msgs == prev:
                break
            prev = msgs
            time.sleep(0.5)
        assert msgs > 10
        assert _value(text, "edgeflow_gateway_commit_latency_seconds_count") == msgs  # one per message
        assert _value(text, 'edgeflow_gateway_commit_latency_seconds_bucket{le="+Inf"}') == msgs
        assert _value(text, "edgeflow_gateway_ack_latency_seconds_count") >= 1
        assert _value(text, "edgeflow_gateway_checkpoint_duration_seconds_count") >= 1
        assert re.search(r'^edgeflow_gateway_build_info\{.*version="[^"]+"', text, re.M)
        assert re.search(r'^edgeflow_gateway_device_watermark_lag_seconds\{device="dev-0000"\}', text, re.M)
        assert _value(text, "edgeflow_gateway_devices_known") == 6
        assert _value(text, "edgeflow_gateway_broker_connected") == 1
        assert re.search(r"^process_resident_memory_bytes", text, re.M)
        assert "edgeflow_gateway_commit_latency_seconds_bucket" in _scrape("http://127.0.0.1:%d/metrics" % wport)
        exported = set()
        for name, typ in re.findall(r"^# TYPE ([a-z_]+) ([a-z]+)$", text, re.M):  # families, also empty ones
            exported |= {name + s for s in {"histogram": ("_bucket", "_sum", "_count"),
                                            "info": ("_info",)}.get(typ, ("",))}
        wanted = _metric_names(open(DASHBOARD).read()) | _metric_names(open(RULES).read())
        assert wanted - exported == set(), "named in the dashboard/rules but not exported"

        hz = "http://127.0.0.1:%d/healthz" % wport
        assert _get(hz) == (200, "ok\n")
        broker.stop()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            st, body = _get(hz)
            if st == 503:
                break
            time.sleep(0.2)
        assert (st, body) == (503, "failing: broker disconnected\n")
        broker.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and _get(hz)[0] != 200:
            time.sleep(0.2)
        assert _get(hz) == (200, "ok\n")
    finally:
        if fleet is not None:
            fleet.close()
        site.close()


def _value(text, name):
    m = re.search(r"^%s ([0-9.e+-]+)$" % re.escape(name), text, re.M)
    assert m, name
    return float(m.group(1))


def test_healthz_fails_when_no_commit_succeeds_with_work_pending(tmp_path):
    """Unit level: pending work and the last commit too long ago."""
    import asyncio

    from gateway import metrics
    from tests.test_gateway_pipeline import TOP, cfg as pcfg, deliver, open_gw
    from shared import wire

    async def go():
        gw = await open_gw(pcfg(tmp_path))
        try:
            import types
            gw.ingest.connected = types.SimpleNamespace(is_set=lambda: True)
            assert metrics.health(gw, 30.0) == (True, [])
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 5, T0)))
            assert metrics.health(gw, 30.0) == (True, [])  # pending, but the gateway just started
            gw.stats.started_mono -= 100
            ok, why = metrics.health(gw, 30.0)
            assert not ok and why[0].startswith("no commit for 1")
            await gw.checkpoint()
            await gw._commit_task
            assert metrics.health(gw, 30.0) == (True, [])  # committed: healthy again
            gw.stats.last_commit_mono -= 100  # idle: nothing pending, an old commit is fine
            assert metrics.health(gw, 30.0) == (True, [])
        finally:
            await gw.store.close()
    asyncio.run(go())


def _inproc_scrape(cfg, msgs, readings, scrape):
    """Runs a gateway on msgs (no MQTT) until `readings` are processed, then returns
    await scrape(gw), the exposition text."""
    import asyncio
    from gateway.service import Gateway
    from tools.bench_compare import MemIngest

    async def go():
        gw = Gateway(cfg, ingest_factory=lambda c, s: MemIngest(msgs, c, s))
        task = asyncio.ensure_future(gw.run())
        for _ in range(1000):  # at most 10 s
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
            if gw.stats.readings >= readings:
                break
        try:
            return await scrape(gw)
        finally:
            gw.stop()
            await task

    return asyncio.run(go())


def test_per_device_lag_gauges_show_only_the_most_lagging_devices(tmp_path):
    """metrics.device_series_max: a series per device of a 10,000-device fleet made each scrape
    1.4 MB and 0.3-0.4 s of the gateway's CPU. The N most lagging devices are exported (what the
    dashboard's topk shows), the count of all devices with a lag beside them."""
    from prometheus_client import generate_latest
    from shared import wire
    from gateway import metrics
    from tools.bench_storm import NOW, encode_batch
    from tools.bench_storm_inproc import T, config

    msgs = []
    for i in range(5):  # device i's newest reading is i * 100 s older: its lag the larger
        dev = "s%05d" % i
        msgs.append((T.state(dev), wire.encode_state(True)))
        msgs.append((T.hello(dev), wire.encode_hello(dev, 1, 0, NOW, 0, 1, 0, i + 1, 1, "test")))
        msgs.append((T.data(dev), encode_batch(dev, i, NOW - 50000 - i * 100000, 0, 50)))

    def scrape(series_max):
        cfg = config(str(tmp_path / ("m%d" % series_max)))
        os.makedirs(os.path.dirname(cfg["store"]["path"]), exist_ok=True)
        cfg["metrics"]["device_series_max"] = series_max

        async def text(gw):
            return generate_latest(metrics.registry(gw)).decode()

        return _inproc_scrape(cfg, msgs, 250, text)

    for series_max, shown in ((2, ["s00003", "s00004"]), (100, ["s0000%d" % i for i in range(5)])):
        text = scrape(series_max)
        for name in ("edgeflow_gateway_device_watermark_lag_seconds", "edgeflow_gateway_device_watermark_lag_ms"):
            assert re.findall(r'^%s\{device="([^"]+)"\}' % name, text, re.M) == shown, (series_max, name)
        assert re.search(r"^edgeflow_gateway_device_watermark_lag_devices 5\.0$", text, re.M)
    lags = [float(v) for v in re.findall(r'^edgeflow_gateway_device_watermark_lag_seconds\{[^}]+\} (\S+)$', text, re.M)]
    assert lags == sorted(lags) and lags[-1] - lags[0] > 390  # 100 s apart, by device


def test_a_scrape_from_the_endpoints_thread_survives_devices_added_meanwhile(tmp_path):
    """The metrics endpoint runs in prometheus_client's thread and reads the event loop's dicts;
    with the GIL switching every 0.5 ms a storm's new device can arrive mid-scrape. Iterating the
    live dict then raised 'dictionary changed size during iteration' and the scrape failed."""
    import asyncio
    from prometheus_client import generate_latest
    from gateway import metrics
    from tools.bench_storm import NOW
    from tools.bench_storm_inproc import config, workload

    added = []

    async def scrape_while_a_device_arrives(gw):
        wm = gw.watermarks
        real = wm.lag

        def lag(dev, now):  # a device arrives while the scrape walks the devices
            if not added:
                added.append(wm.observe("late-comer", NOW, 0))
            return real(dev, now)

        wm.lag = lag
        try:  # in another thread, as prometheus_client's endpoint
            return (await asyncio.get_running_loop().run_in_executor(None, generate_latest,
                                                                     metrics.registry(gw))).decode()
        finally:
            del wm.lag

    text = _inproc_scrape(config(str(tmp_path)), workload("storm", 5, 50), 250, scrape_while_a_device_arrives)
    assert added
    assert re.search(r"^edgeflow_gateway_device_watermark_lag_devices 5\.0$", text, re.M)  # the copy it walked
