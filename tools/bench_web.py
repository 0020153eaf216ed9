"""Does an open web view slow the gateway? Throughput with pages open and updating vs none, one run.

    .venv/bin/python tools/bench_web.py [--msgs 20000] [--per-msg 50] [--pages 3] [--pairs 3] [--browser]

Same drain as tools/bench_gateway.py (own plaintext mosquitto, QoS 1 stream preloaded into the broker,
timed until every reading is committed), with the gateway's web view on. Runs alternate:
no page / pages open. A "page" is what the browser does (the snapshot, the selected device's
history, then the server-sent event stream, read as it comes) in a separate process, so the
pages' own CPU is not the gateway's; --browser opens real headless chromium tabs instead
(their rendering then competes for the same cores). Prints each run, the medians and the
ratio with/without. Not a test: a figure for docs/operations.md.
"""
import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.bench_gateway import _run_gateway, gateway_cfg, raw_publish, workload  # noqa: E402
from tools.broker import Mosquitto, free_port  # noqa: E402

PAGE = r"""
import json, sys, threading, time, urllib.request
port, pages, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
events = [0] * pages
def page(i):
    base = "http://127.0.0.1:%d/" % port
    while True:
        try:
            urllib.request.urlopen(base, timeout=2).read()
            break
        except OSError:
            time.sleep(0.02)
    urllib.request.urlopen(base + "static/app.js").read()
    json.load(urllib.request.urlopen(base + "api/snapshot"))
    json.load(urllib.request.urlopen(base + "api/history?key=" + key))
    r = urllib.request.urlopen(base + "api/events", timeout=60)
    data = []
    for ln in r:
        if ln.startswith(b"data: "):
            json.loads(ln[6:])  # what the page's script does with it
            events[i] += 1
ts = [threading.Thread(target=page, args=(i,), daemon=True) for i in range(pages)]
for t in ts: t.start()
try:
    sys.stdin.read()  # until the bench closes our stdin
finally:
    print(json.dumps(events), flush=True)
"""


class Pages:
    def __init__(self, port, n, browser):
        self.browser = browser
        self.drivers = []
        self.proc = None
        self.n = n
        if browser:  # chromium starts now; the tabs load once the gateway's web view is up
            import pathlib
            import threading
            from tests.test_web_browser import _browser
            self.drivers = [_browser(pathlib.Path(tempfile.mkdtemp(prefix="bench-web-chrome-"))) for _ in range(n)]
            self.t = threading.Thread(target=self._open_browsers, args=(port,), daemon=True)
            self.t.start()
        else:
            self.proc = subprocess.Popen([sys.executable, "-c", PAGE, str(port), str(n), "dev0000"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _open_browsers(self, port):
        for d in self.drivers:
            d.set_page_load_timeout(30)
            while True:  # the gateway (and its web view) starts with the drain
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    time.sleep(0.02)
            d.get("http://127.0.0.1:%d/" % port)

    def close(self):
        if self.proc is not None:
            out, _ = self.proc.communicate(b"", timeout=30)
            return out.decode().strip()
        self.t.join(60)
        ups = []
        for d in self.drivers:
            try:
                ups.append(d.execute_script("return window.edgeflow.updates"))
            finally:
                d.quit()
        return str(ups)


def one_run(port, tmp, name, msgs, n_readings, pages, browser, update_ms, index=True):
    db = os.path.join(tmp, name + ".db")
    cfg = gateway_cfg(port, db, "FULL")
    cfg["mqtt"]["client_id"] = "bench-web-" + name
    wport = free_port()
    cfg["web"] = {"port": wport, "update_ms": update_ms}
    cfg["store"]["index_readings"] = index
    cfg["security"] = {"insecure": True}  # plaintext, anonymous broker: the bench is about the web view
    asyncio.run(_run_gateway(dict(cfg, web={"port": 0}), register_only=True))
    raw_publish(port, msgs, "pub-" + name)
    time.sleep(0.2)
    pg = Pages(wport, pages, browser) if pages else None
    try:
        c0 = _cpu()
        dt = asyncio.run(_run_gateway(cfg, until_readings=n_readings))["seconds"]
        cpu = _cpu() - c0
    finally:
        seen = pg.close() if pg is not None else ""
    return n_readings / dt, dt, seen, cpu


def _cpu():
    """CPU seconds of this process (the gateway's loop, its SQLite and web threads); the pages
    run in another process. Robust to other load on the machine, unlike wall time."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_web", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=_version_line("bench_web"))
    ap.add_argument("--msgs", type=int, default=20000)
    ap.add_argument("--per-msg", type=int, default=50)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--pages", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--update-ms", type=int, default=1000, help="web.update_ms (the default is 1000)")
    ap.add_argument("--browser", action="store_true", help="real headless chromium tabs instead of page clients")
    ap.add_argument("--index-ab", action="store_true",
                    help="no pages; alternate store.index_readings off / on instead (the index's insert cost)")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the broker
    tmp = tempfile.mkdtemp(prefix="edgeflow-bench-web-")
    broker = Mosquitto(tmp, persistence=False, insecure=True).start()
    port = broker.port
    n = a.msgs * a.per_msg
    res = {0: [], 1: []}
    cpu = {0: [], 1: []}
    labels = ("no index", "index") if a.index_ab else ("no page", "pages open")
    try:
        print("mosquitto on 127.0.0.1:%d, QoS 1, %d devices, %d msgs x %d readings, SQLite FULL, web view on; "
              "pages: %d %s, update_ms %d" % (port, a.devices, a.msgs, a.per_msg, a.pages,
                                               "chromium tabs" if a.browser else "page clients", a.update_ms))
        for i in range(a.pairs):
            for open_ in ((0, 1) if i % 2 == 0 else (1, 0)):
                msgs = workload(a.devices, a.msgs, a.per_msg, prefix="edgeflow")
                if a.index_ab:  # 0: no (device, t) index, 1: with it
                    rate, dt, seen, c = one_run(port, tmp, "r%d%d" % (i, open_), msgs, n, 0, False, a.update_ms,
                                                index=bool(open_))
                else:
                    rate, dt, seen, c = one_run(port, tmp, "r%d%d" % (i, open_), msgs, n,
                                                a.pages if open_ else 0, a.browser, a.update_ms)
                res[open_].append(rate)
                cpu[open_].append(c / n * 1e6)
                print("run %d %-10s %8.0f readings/s committed (%.2f s, gateway CPU %.2f s = %.2f us/reading)%s" % (
                    i, labels[open_], rate, dt, c, c / n * 1e6,
                    "  updates per page %s" % seen if open_ and not a.index_ab else ""), flush=True)
    finally:
        broker.stop()
    m0, m1 = statistics.median(res[0]), statistics.median(res[1])
    print("median %-10s %8.0f readings/s (runs: %s)" % (labels[0], m0, ", ".join("%.0f" % r for r in res[0])))
    print("median %-10s %8.0f readings/s (runs: %s)" % (labels[1], m1, ", ".join("%.0f" % r for r in res[1])))
    print("ratio %s / %s: %.2f" % (labels[1], labels[0], m1 / m0))
    c0, c1 = statistics.median(cpu[0]), statistics.median(cpu[1])
    print("gateway CPU per reading: %.2f us %s, %.2f us %s (ratio %.2f)" % (c0, labels[0], c1, labels[1], c1 / c0))
    return 0


def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
