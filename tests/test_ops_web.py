"""The web view's server side, in-process (no broker): vendored chart library, snapshot and
history in real units, the live stream, read-only, bounded per-page buffers."""
import asyncio
import hashlib
import json
import os
import re
import urllib.error
import urllib.request

from gateway.web import WebView
from shared import wire
from tests.conftest import ROOT, free_port
from tests.test_gateway_fakes import T0, readings
from tests.test_gateway_pipeline import TOP, cfg, deliver, flush, open_gw

STATIC = os.path.join(ROOT, "gateway", "static")


def test_vendored_uplot_is_the_npm_version():
    pkg = json.load(open(os.path.join(ROOT, "package.json")))["dependencies"]["uplot"]
    lock = json.load(open(os.path.join(ROOT, "package-lock.json")))["packages"]["node_modules/uplot"]
    assert lock["version"] == pkg and lock["license"] == "MIT"
    js = open(os.path.join(STATIC, "uPlot.iife.min.js"), "rb").read()
    assert re.match(rb"/\*! https://github.com/leeoniya/uPlot \(v%s\) \*/" % pkg.encode(), js), js[:80]
    assert "MIT License" in open(os.path.join(STATIC, "uPlot.LICENSE")).read()
    mod = os.path.join(ROOT, "node_modules", "uplot")
    if os.path.isdir(mod):  # after `npm ci`: the vendored files are the package's, byte for byte
        assert json.load(open(os.path.join(mod, "package.json")))["version"] == pkg
        for ours, theirs in (("uPlot.iife.min.js", "dist/uPlot.iife.min.js"), ("uPlot.min.css", "dist/uPlot.min.css"),
                             ("uPlot.LICENSE", "LICENSE")):
            a = hashlib.sha256(open(os.path.join(STATIC, ours), "rb").read()).hexdigest()
            b = hashlib.sha256(open(os.path.join(mod, theirs), "rb").read()).hexdigest()
            assert a == b, ours
    # and the wheel ships them (a Raspberry Pi install has no node_modules)
    assert 'gateway = ["static/*"' in open(os.path.join(ROOT, "pyproject.toml")).read()


def _req(port, path, method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        r = urllib.request.urlopen(req, timeout=10)
        return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_snapshot_history_and_live_stream(tmp_path):
    port = free_port()

    async def go():
        gw = await open_gw(cfg(tmp_path, web={"port": port, "update_ms": 100},
                               channels={"device": {"n1": {"1": {"name": "water", "unit": "degC"}}}}))
        gw.ingest.connected = asyncio.Event()
        gw.ingest.connected.set()
        view = await WebView(gw).start()
        loop = asyncio.get_running_loop()
        call = lambda *a: loop.run_in_executor(None, _req, port, *a)  # noqa: E731
        try:
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 60, T0)))
            deliver(gw, TOP.data("n1"), b"junk")
            await flush(gw)
            st, body = await call("/api/snapshot")
            snap = json.loads(body)
            assert st == 200 and snap["devices"] == 1 and snap["broker_connected"] is True
            (row,) = snap["fleet"]
            assert row["device"] == "n1" and row["online"] and row["quarantined"] == 1 and row["received"] == 60
            assert snap["channels"]["*/0"] == ["temp", "degC"] and snap["channels"]["n1/1"] == ["water", "degC"]
            assert [q["reason"] for q in snap["quarantine"]] == ["bad_magic"] and snap["groups"] == ["all0"]
            st, body = await call("/api/history?key=n1")
            w = json.loads(body)["windows"]
            assert w and all(r[2] == "n1" for r in w)
            # real units: the fake readings are fixed point x1000
            assert all(isinstance(r[8], float) and r[9] <= r[8] <= r[10] for r in w)
            assert (await call("/api/snapshot", "POST"))[0] == 405  # read-only
            assert (await call("/api/../../etc/passwd"))[0] == 404
            st, body = await call("/")
            assert st == 200 and b"static/uPlot.iife.min.js" in body

            # the live stream: new window rows and alerts after the page connected
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"text/event-stream" in head
            await asyncio.sleep(0.3)  # the poller took its cursors
            deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(60, 60, T0)))
            await flush(gw)
            got = b""
            while b'"windows":[[' not in got:
                got += await asyncio.wait_for(reader.read(65536), 10)
            ev = [ln for ln in got.split(b"\n") if ln.startswith(b"data: ") and b'"windows":[[' in ln][0]
            upd = json.loads(ev[6:])
            assert upd["fleet"][0]["received"] == 120 and "n1" in {r[2] for r in upd["windows"]} <= {"n1", "all0"}
            writer.close()
        finally:
            await view.stop()
            await gw.store.close()
    asyncio.run(go())


def test_a_page_that_does_not_read_is_dropped(tmp_path):
    """Each page has a bounded buffer: one that stops reading costs at most 8 updates."""
    port = free_port()

    async def go():
        gw = await open_gw(cfg(tmp_path, web={"port": port, "update_ms": 100}))
        gw.ingest.connected = asyncio.Event()
        view = await WebView(gw).start()
        try:
            q = asyncio.Queue(maxsize=8)
            view.clients.add(q)  # a page whose handler never takes its messages
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # and a live one starts the poller
            writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            for _ in range(100):
                await asyncio.sleep(0.1)
                if view.dropped_clients:
                    break
            assert view.dropped_clients == 1 and q not in view.clients and q.qsize() <= 8
            writer.close()
        finally:
            await view.stop()
            await gw.store.close()
    asyncio.run(go())
