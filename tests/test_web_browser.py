"""The live web view in a real browser: Debian's chromium + chromedriver driven by selenium,
against a gateway (subprocess) fed by the fleet simulator (real firmware Apps) through a
real mosquitto. Asserts what a person sees: a row per device, plots with points drawn,
an alert that appears without a reload. Saves a screenshot (EDGEFLOW_SCREENSHOT=path
copies it there; docs/img/web-view.png is made that way)."""
import asyncio
import os
import re
import shutil
import threading
import time

import pytest

from tests.conftest import free_port
from tools.fleet import Fleet, Site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
N = 6


def _browser(tmp_path):
    if not CHROMIUM or not os.path.exists(DRIVER):
        pytest.fail("chromium and chromium-driver are not installed: apt-get install chromium chromium-driver "
                    "(tools/setup.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1400,1250", "--user-data-dir=%s" % (tmp_path / "chrome")):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


class FleetThread:
    """The simulated fleet in its own thread and loop (selenium blocks)."""

    def __init__(self, port, broker):
        self.port = port
        self.broker = broker
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error = None
        self.t = threading.Thread(target=self._main, name="fleet", daemon=True)
        self.t.start()

    def _main(self):
        async def go():
            fleet = Fleet(N, self.port, None, seed=5, sample_ms=100, window_ms=2000, cfg_over={"status_every_s": 2}, broker=self.broker)
            await fleet.start(stagger_s=0.3)
            self.ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
            await fleet.shutdown()
        try:
            asyncio.run(go())
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.ready.set()

    def close(self):
        self.stop.set()
        self.t.join(30)


def _listening(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def _wait(what, fn, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError("timed out waiting for " + what)


@pytest.mark.broker
def test_web_view_in_chromium(broker, tmp_path):
    wport = free_port()
    site = Site(tmp_path / "site", broker=broker, window_ms=2000, lateness_ms=4000, ooo_ms=300, idle_ms=5000,
                gw_extra={"web": {"port": wport, "update_ms": 500}})
    fleet = driver = None
    try:
        site.start_broker().start_gateway()
        fleet = FleetThread(site.port, site.mq)
        assert fleet.ready.wait(30) and fleet.error is None, fleet.error
        driver = _browser(tmp_path)
        _wait("the gateway's web view listening", lambda: _listening(wport), 30)
        driver.get("http://127.0.0.1:%d/" % wport)
        driver.execute_script("window.__sameLoad = 42")  # gone if the page reloads

        # a row per device, online
        def texts(sel):  # read in one go: the page re-renders its tables on every update
            return driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map(r => r.innerText)", sel)

        def rows():
            t = texts("#fleet tbody tr")
            return t if len(t) >= N else None
        fleet_rows = _wait("a fleet row per device", rows)
        for i in range(N):
            assert any(re.match(r"dev-%04d\s+online\s" % i, t) for t in fleet_rows), fleet_rows

        # plots of the selected device: one per channel, titled with name and unit, points drawn
        def plotted():
            divs = driver.find_elements("css selector", "#plots .plot")
            pts = [int(d.get_attribute("data-points") or 0) for d in divs]
            return divs if len(divs) >= 3 and min(pts) >= 3 else None
        divs = _wait("three plots with points", plotted)
        titles = " | ".join(d.find_element("css selector", ".u-title").text for d in divs)
        assert "temp (degC)" in titles and "hum (%RH)" in titles, titles
        inked = driver.execute_script("""
            const c = document.querySelector('#plots .plot canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
            return n;""")
        assert inked > 500, "the plot canvas is blank (%d pixels drawn)" % inked

        # an alert arrives over the live stream (device spikes fire the CEP rule) and shows
        _wait("an alert appearing live", lambda: driver.execute_script("return window.edgeflow.alertsLive") > 0, 90)
        live_rows = texts("#alerts tbody tr.new")
        assert any("spike" in r and "cep" in r for r in live_rows), live_rows

        # bad input shows up in the quarantine list with its reason, live
        import paho.mqtt.client as paho
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="web-test-bad")
        c.connect(*broker.paho(c, broker.service("web-test-bad")))
        c.loop_start()
        c.publish("edgeflow/d/dev-0003/data", b"not a record", qos=1).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        _wait("the quarantined message listed live", lambda: any(
            "bad_magic" in r for r in texts("#quarantine tbody tr.new")))
        # the devices' status records: backlog on the device and clock offset filled in
        _wait("device status in the fleet table", lambda: all(
            not r.rstrip().endswith("-") for r in texts("#fleet tbody tr")))
        assert driver.execute_script("return window.__sameLoad") == 42, "the page reloaded"
        assert driver.execute_script("return window.edgeflow.updates") >= 2
        assert "connected" in driver.find_element("id", "broker").text
        assert driver.find_element("id", "watermark").text != "-"

        shot = tmp_path / "web-view.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20000
        dest = os.environ.get("EDGEFLOW_SCREENSHOT")
        if dest:
            shutil.copy(shot, dest)
    finally:
        if driver is not None:
            driver.quit()
        if fleet is not None:
            fleet.close()
        site.close()
