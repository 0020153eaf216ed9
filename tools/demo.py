"""edgeflow-demo: broker + gateway + a simulated fleet, faults, live progress, ground-truth report.

    edgeflow-demo                         # 50 devices, 75 s, Wi-Fi outage, power cut, gateway kill -9, storm
    edgeflow-demo --devices 200 --duration 120 --seed 3

Everything runs on 127.0.0.1 on free ports: mosquitto (tools/brokerconf.py), the gateway
(`python -m gateway.cli run`, a subprocess) and the fleet (real firmware Apps on SimHal, in
this process). At the end the devices go quiet, drain their outboxes, the gateway stops
cleanly and tools/groundtruth.py compares the gateway's SQLite with what every device
stored on flash. Exit status 0 only if nothing was lost, duplicated or miscounted.
Ctrl-C stops everything (fleet, gateway, broker). docs/demo.md has a sample run.
"""
import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import groundtruth  # noqa: E402
from tools.broker import free_port, mosquitto_bin  # noqa: E402
from tools.fleet import Event, Fleet, Site, parse_faults, run_scenario  # noqa: E402


def default_faults(d, n):
    """The demo's script, scaled to the duration d (s)."""
    k = max(1, n // 5)
    return [
        Event("outage", round(0.12 * d, 1), round(0.18 * d, 1), "0-%d" % (k - 1)),
        Event("powercut", round(0.22 * d, 1), 0, "%d" % min(k, n - 1)),
        Event("tornwrite", round(0.25 * d, 1), 0, "%d" % min(k + 1, n - 1)),
        Event("dup", round(0.30 * d, 1), round(0.15 * d, 1), "0.1"),
        Event("gwkill", round(0.42 * d, 1), 3, None),
        Event("storm", round(0.62 * d, 1), round(0.15 * d, 1), None),
    ]


class Status:
    """Live progress: one refreshed line on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, fleet, site, t0, out=sys.stdout):
        self.fleet, self.site, self.t0, self.out = fleet, site, t0, out
        self.tty = out.isatty()
        self.last_rows = None
        self.last_t = None
        self.last_print = 0
        self.phase = "run"
        self.rate = 0.0

    def _db(self):
        if not os.path.exists(self.site.db):
            return None
        try:
            db = sqlite3.connect("file:%s?mode=ro" % self.site.db, uri=True, timeout=0.2)
            try:
                # every record the gateway committed (readings, windows, alerts, status, gaps):
                # the same kinds the devices' "stored" counts
                rows = db.execute("SELECT coalesce(sum(received), 0) FROM devices").fetchone()[0]
                wm = db.execute("SELECT v FROM meta WHERE k = 'global_watermark'").fetchone()
                alerts = db.execute("SELECT (SELECT count(*) FROM cep_events) + (SELECT count(*) FROM anomalies)"
                                    ).fetchone()[0]
                late = db.execute("SELECT count(*) FROM late").fetchone()[0]
            finally:
                db.close()
            return rows, (int(wm[0]) if wm and wm[0] is not None else None), alerts, late
        except sqlite3.Error:
            return None

    def fields(self):
        """(label, value) in priority order: a narrow terminal shows the first ones."""
        now = time.monotonic()
        s = self.fleet.stats()
        g = self._db()
        rows, wm, alerts, late = g if g else (0, None, 0, 0)
        if self.last_rows is not None and now > self.last_t:
            self.rate = (rows - self.last_rows) / (now - self.last_t)
        self.last_rows, self.last_t = rows, now
        lag = "%.1fs" % ((time.time() * 1000 - wm) / 1000.0) if wm else "-"
        gw = "up" if self.site.gateway_alive() else "DOWN"
        br = "up" if self.site.broker is not None and self.site.broker.poll() is None else "DOWN"
        return [("t", "%.0fs %s" % (now - self.t0, self.phase)), ("online", "%d/%d" % (s["online"], s["devices"])),
                ("stored", str(s["stored"])), ("committed", str(rows)), ("unacked", str(s["unacked"])),
                ("records/s", "%.0f" % self.rate), ("lag", lag), ("broker", br), ("gateway", gw),
                ("alerts", str(alerts)), ("late", str(late))]

    def line(self, width=None):
        """Records stored on the devices' flash, committed by the gateway, still unacked on
        flash; committed records/s; global watermark lag. Cut to width at a field boundary."""
        out = ""
        for k, v in self.fields():
            part = ("  " if out else "") + k + " " + v
            if width is not None and len(out) + len(part) > width:
                break
            out += part
        return out

    def tick(self, force=False):
        now = time.monotonic()
        every = 1.0 if self.tty else 5.0
        if not force and now - self.last_print < every:
            return
        self.last_print = now
        if self.tty:
            ln = self.line(max(20, shutil.get_terminal_size((160, 20)).columns - 1))
            self.out.write("\r\033[K" + ln)
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def say(self, msg):
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write("t=%4.0fs %s\n" % (time.monotonic() - self.t0, msg))
        self.out.flush()


def build_parser():
    p = argparse.ArgumentParser(prog="edgeflow-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=_version_line("edgeflow-demo"))
    p.add_argument("--devices", type=int, default=50, help="simulated devices (default 50)")
    p.add_argument("--duration", type=float, default=75, help="seconds of sampling and faults (default 75)")
    p.add_argument("--seed", type=int, default=1, help="seed of signals, fault picks, jitter")
    p.add_argument("--sample-ms", type=int, default=250, help="device sampling period (default 250)")
    p.add_argument("--window-ms", type=int, default=10000, help="gateway (and device) window size")
    p.add_argument("--lateness-ms", type=int, default=20000, help="gateway allowed lateness")
    p.add_argument("--faults", default=None, help="replace the default fault script (tools/fleet.py syntax), "
                                                  "'' for none")
    p.add_argument("--dir", help="data dir (default: ./var/demo-<time>, kept so the SQLite file can be inspected)")
    p.add_argument("--discard", action="store_true", help="use a temp dir and remove it at the end")
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # the default now; accepted for old scripts
    p.add_argument("--drain-timeout", type=float, default=90)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if mosquitto_bin() is None:
        print("edgeflow-demo: mosquitto is not installed. Run `bash tools/setup.sh` "
              "(or `sudo apt-get install mosquitto`) and try again.", file=sys.stderr)
        return 2
    keep = not args.discard or bool(args.dir)
    if args.dir:
        d = args.dir
    elif keep:
        d = os.path.join(os.getcwd(), "var", "demo-%s" % time.strftime("%Y%m%d-%H%M%S"))
    else:
        d = tempfile.mkdtemp(prefix="edgeflow-demo-")
    os.makedirs(d, exist_ok=True)
    web_port = free_port()  # the live web view of the demo's gateway
    site = Site(d, window_ms=args.window_ms, lateness_ms=args.lateness_ms, ooo_ms=2000, idle_ms=15000,
                gw_extra={"web": {"port": web_port}})
    truth = os.path.join(d, "truth.db")
    events = default_faults(args.duration, args.devices) if args.faults is None else parse_faults(args.faults)
    print("edgeflow demo: %d devices sampling 3 channels every %d ms for %.0f s, data in %s"
          % (args.devices, args.sample_ms, args.duration, d))
    print("faults: %s" % (", ".join(repr(e) for e in events) or "none"))
    rc = 1
    try:
        site.start_broker()
        print("broker: mosquitto %s on 127.0.0.1:%d (TLS, a password per device, ACLs: %s)" % (
            mosquitto_bin(), site.port, site.mq.fleet.root if site.mq.fleet else "insecure"))
        site.start_gateway()
        print("gateway: python -m gateway.cli run -c %s (log %s/gateway.log)" % (site.gw_conf, d))
        print("web view: http://127.0.0.1:%d/  (fleet, plots, alerts; live)" % web_port)
        rc = asyncio.run(_run(args, site, truth, events))
    except KeyboardInterrupt:
        rc = 130
    finally:
        site.close()
        if rc == 130:
            print("\nedgeflow-demo: interrupted; broker, gateway and fleet stopped")
        if keep:
            print("data kept in %s" % d)
        else:
            shutil.rmtree(d, ignore_errors=True)
            print("data dir %s removed (--discard)" % d)
    return rc


async def _run(args, site, truth, events):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = Fleet(args.devices, site.port, truth, args.seed, args.sample_ms, args.window_ms, broker=site.mq)
    fleet.truth.meta("windows", site.windows)
    t0 = time.monotonic()
    st = Status(fleet, site, t0)
    interrupted = False
    report = None
    try:
        await fleet.start(stagger_s=min(3.0, args.devices * 0.02))
        st.say("fleet started: %d devices" % args.devices)
        sc = asyncio.ensure_future(run_scenario(fleet, events, site, log=st.say))
        end = t0 + args.duration
        while time.monotonic() < end and not stop.is_set():
            st.tick()
            await asyncio.sleep(0.2)
        if not stop.is_set():
            waited = asyncio.ensure_future(stop.wait())
            await asyncio.wait([sc, waited], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            waited.cancel()
        if stop.is_set():
            interrupted = True
            sc.cancel()
            return 130
        st.phase = "drain"
        st.say("sampling stopped: devices drain their outboxes")
        dr = asyncio.ensure_future(fleet.quiesce(args.drain_timeout, on_tick=st.tick))
        waited = asyncio.ensure_future(stop.wait())
        await asyncio.wait([dr, waited], return_when=asyncio.FIRST_COMPLETED)
        waited.cancel()
        if stop.is_set():
            interrupted = True
            dr.cancel()
            return 130
        drained = dr.result()
        st.tick(force=True)
        if st.tty:
            print()
        st.say("drained: %s; stopping the gateway (final checkpoint)" % ("yes" if drained else "NO (timeout)"))
    finally:
        await fleet.shutdown()
        fleet.truth.close()
        if interrupted:
            site.close()
    await loop.run_in_executor(None, site.stop_gateway)
    report = groundtruth.check(site.db, [truth], site.windows)
    s = fleet.stats()
    print()
    print(report.text())
    print("fleet: %d devices, %d records stored, %d sent (%d replayed), %d CEP alerts, %d anomalies, "
          "%d gateway kill -9, %d duplicates injected" % (
              s["devices"], s["stored"], s["sent"], s["replayed"], s["cep"], s["anomalies"], site.gw_kills,
              fleet.dup.sent if fleet.dup else 0))
    print("SQLite: %s   (look inside: python -m gateway.cli status --db %s)" % (site.db, site.db))
    return 0 if report.ok and not fleet.errors else 1



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
