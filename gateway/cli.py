"""edgeflow-gateway: run | status | export | web-token.

Conventions: --version; a config error or a bad argument exits 2 (systemd does not
restart on it: RestartPreventExitStatus=2); EDGEFLOW_CONFIG is the default --config and
EDGEFLOW_DB the default --db; output cut short by a closed pipe (`| head`) ends quietly.
"""
import argparse
import asyncio
import csv
import faulthandler
import fnmatch
import json
import os
import signal
import sqlite3
import sys
import time

from . import accel
from .config import Config, ConfigError
from .store import OUTPUT_TABLES, STATE_TABLES, VIEWS
from .version import version_line

ENV_CONFIG = "EDGEFLOW_CONFIG"
ENV_DB = "EDGEFLOW_DB"


class UsageError(Exception):
    """A bad argument found after parsing (a --where SQLite rejects): exit 2."""


def _broker(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected host:port, got %r" % s)
    return host, int(port)


def build_parser():
    p = argparse.ArgumentParser(prog="edgeflow-gateway",
                                description="edgeflow gateway: MQTT -> dedup -> watermarks -> windows -> SQLite")
    p.add_argument("--version", action="version", version="%s; %s" % (version_line("edgeflow-gateway"), accel.summary()))
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the gateway (defaults: broker 127.0.0.1:1883, ./edgeflow.db)")
    r.add_argument("--config", "-c", default=os.environ.get(ENV_CONFIG) or None,
                   help="TOML config file (see gateway.example.toml); default $%s" % ENV_CONFIG)
    r.add_argument("--broker", type=_broker, help="host:port, overrides mqtt.host/port")
    r.add_argument("--db", help="SQLite path, overrides store.path")
    r.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables), overrides metrics.port")
    r.add_argument("--log-format", choices=("kv", "json"), help="overrides log.format")
    r.add_argument("--check", action="store_true", help="validate the config, print it as JSON and exit")
    r.add_argument("--insecure", action="store_true",
                   help="allow no TLS / MQTT credentials / devices file (overrides security.insecure)")
    s = sub.add_parser("status", help="devices, watermark lag, backlog, drops, recent alerts (from the database)")
    s.add_argument("--db", default=None, help="SQLite path (default: $%s, store.path of --config, or edgeflow.db)"
                   % ENV_DB)
    s.add_argument("--config", "-c", default=os.environ.get(ENV_CONFIG) or None)
    s.add_argument("--alerts", type=int, default=10, help="recent alerts to show")
    s.add_argument("--device", action="append", metavar="GLOB", help="only devices matching (repeatable), e.g. 'hall-*'")
    s.add_argument("--offline", action="store_true", help="only devices whose last state is offline")
    s.add_argument("--lagging", type=float, metavar="SECONDS", help="only devices whose watermark lags more than this")
    s.add_argument("--json", action="store_true")
    e = sub.add_parser("export", help="a table as CSV or JSON")
    e.add_argument("table", choices=VIEWS + OUTPUT_TABLES + ("channels",) + STATE_TABLES,
                   help="a *_v view is in real units with ISO times and channel names")
    e.add_argument("--db", default=None)
    e.add_argument("--config", "-c", default=os.environ.get(ENV_CONFIG) or None)
    e.add_argument("--format", choices=("csv", "json"), default="csv")
    e.add_argument("--out", "-o", help="file (default stdout)")
    e.add_argument("--where", help="SQL condition, e.g. \"device = 'n1'\"")
    sub.add_parser("web-token", help="make an access token for the web view: prints the token and the "
                                     "web.token_sha256 line for the config")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "web-token":
            return cmd_web_token(args)
        return cmd_export(args)
    except ConfigError as e:
        print("edgeflow-gateway: config error: %s" % e, file=sys.stderr)
        return 2
    except UsageError as e:
        print("edgeflow-gateway: %s" % e, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`| head`): no traceback, and no second error when Python
        # flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except sqlite3.Error as e:
        print("edgeflow-gateway: database error: %s" % e, file=sys.stderr)
        return 1


def _load(args):
    ov = {}
    if getattr(args, "broker", None):
        ov["mqtt.host"], ov["mqtt.port"] = args.broker
    if getattr(args, "db", None):
        ov["store.path"] = args.db
    if getattr(args, "metrics_port", None) is not None:
        ov["metrics.port"] = args.metrics_port
    if getattr(args, "log_format", None):
        ov["log.format"] = args.log_format
    if getattr(args, "insecure", False):
        ov["security.insecure"] = True
    return Config.load(args.config, ov)


def cmd_run(args):
    cfg = _load(args)
    cfg.check_secure()
    if args.check:
        print(json.dumps(cfg.as_dict(), indent=2))
        return 0
    from . import logs
    from .service import Gateway
    logs.setup(cfg.log.level, cfg.log.format)
    # a fatal signal (SIGBUS from a shared-memory page of a filesystem gone read-only or full)
    # still leaves a message and the stack on stderr
    faulthandler.enable()
    gw = Gateway(cfg)

    async def go():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gw.stop)
        await gw.run()

    try:
        asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - fatal: reported, exit non-zero, systemd restarts
        logs.error("gateway_failed", error=str(e) or repr(e), kind=type(e).__name__)
        _exit_now_if_stuck(1)
        return 1
    return 0


def _exit_now_if_stuck(status):
    """After a fatal error the process must end even if a worker thread is stuck in a
    system call (a hung disk): a non-daemon thread would keep it alive forever."""
    import threading

    from . import logs
    deadline = time.monotonic() + 3.0
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))  # a thread just finishing its stop
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        logs.error("gateway_exit_forced", reason="worker thread still running after the failure")
        sys.stderr.flush()
        os._exit(status)


def cmd_web_token(args):
    import secrets
    from .web import token_hash
    tok = secrets.token_urlsafe(32)
    print("token (give it to the people who may look; the browser asks for it as password): %s" % tok)
    print("config ([web] section, or env EDGEFLOW_WEB_TOKEN_SHA256):")
    print('token_sha256 = "%s"' % token_hash(tok))
    return 0


def _connect(args):
    path = args.db or os.environ.get(ENV_DB) or _load(args).store.path
    if not os.path.exists(path):
        raise ConfigError("no database at %s" % path)
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    db.row_factory = sqlite3.Row
    return db


def cmd_status(args):
    db = _connect(args)
    cfg = _load(args)
    delay = cfg.watermark.out_of_orderness_ms + 1
    now = int(time.time() * 1000)
    wms = {r["device"]: r["max_t"] for r in db.execute("SELECT device, max_t FROM device_watermarks")}
    devices = []
    for r in db.execute("SELECT * FROM devices ORDER BY device"):
        mt = wms.get(r["device"])
        if args.device and not any(fnmatch.fnmatchcase(r["device"], g) for g in args.device):
            continue
        if args.offline and r["online"]:
            continue
        lag_s = None if mt is None else (now - (mt - delay)) / 1000.0
        if args.lagging is not None and (lag_s is None or lag_s <= args.lagging):
            continue
        devices.append({
            "device": r["device"], "online": bool(r["online"]), "fw": r["fw"],
            "last_seen_s_ago": round((now - r["last_seen_ms"]) / 1000.0, 1) if r["last_seen_ms"] else None,
            "watermark": None if mt is None else mt - delay,
            "watermark_lag_s": None if mt is None else round((now - (mt - delay)) / 1000.0, 1),
            "backlog_announced": r["backlog"], "received": r["received"], "duplicates": r["duplicates"],
            "late": r["late"], "quarantined": r["quarantined"], "unsynced": r["unsynced"],
            "dropped_by_device": r["dropped_by_device"], "outbox_records": r["outbox_records"],
            "outbox_dropped": r["outbox_dropped"], "reconnects": r["reconnects"],
            "last_seen": _iso(r["last_seen_ms"]), "clock_offset_ms": r["clock_offset_ms"],
        })
    alerts = []
    q = ("SELECT 'cep' AS type, device, t, rule AS what, severity AS level FROM cep_events "
         "UNION ALL SELECT 'anomaly', device, t, 'channel ' || channel || ' score ' || (score / 1000.0), detector "
         "FROM anomalies ORDER BY t DESC LIMIT ?")
    for r in db.execute(q, (args.alerts,)):
        alerts.append(dict(r))
    meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    gwm = meta.get("global_watermark")
    counts = {t: db.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
              for t in ("readings", "window_results", "late", "quarantine", "unsynced")}
    summary = {"global_watermark": gwm, "global_lag_s": None if gwm is None else round((now - gwm) / 1000.0, 1),
               "rows": counts, "devices": devices, "recent_alerts": alerts}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print("global watermark: %s (lag %s)   rows: %s" % (_iso(gwm) or "-", _human_s(summary["global_lag_s"]),
                                                        " ".join("%s=%d" % kv for kv in counts.items())))
    cols = ("device", "online", "last seen", "watermark lag", "backlog", "received", "duplicates", "late",
            "quarantined", "dropped", "outbox dropped", "fw")
    rows = [[d["device"], "online" if d["online"] else "OFFLINE",
             "never" if d["last_seen_s_ago"] is None else _human_s(d["last_seen_s_ago"]) + " ago",
             _human_s(d["watermark_lag_s"]),
             _n(d["outbox_records"] if d["outbox_records"] is not None else d["backlog_announced"]), _n(d["received"]), _n(d["duplicates"]),
             _n(d["late"]), _n(d["quarantined"]), _n(d["dropped_by_device"]), _n(d["outbox_dropped"]),
             d["fw"] or "-"] for d in devices]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if not devices:
        print("(no device matches)" if (args.device or args.offline or args.lagging is not None) else "(no devices yet)")
    print("recent alerts:")
    for a in alerts:
        print("  %s %s %s %s (%s)" % (_iso(a["t"]), a["type"], a["device"], a["what"], a["level"]))
    return 0


def _iso(ms):
    if ms is None or ms == 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000.0)) + "Z"


def _human_s(s):
    if s is None:
        return "-"
    a = abs(s)
    if a < 100:
        return "%.1f s" % s
    if a < 7200:
        return "%.1f min" % (s / 60.0)
    if a < 172800:
        return "%.1f h" % (s / 3600.0)
    return "%.1f d" % (s / 86400.0)


def _n(v):
    return "-" if v is None else str(v)


def cmd_export(args):
    db = _connect(args)
    sql = "SELECT * FROM %s" % args.table  # table name checked by argparse choices
    if args.where:
        sql += " WHERE " + args.where
    try:
        cur = db.execute(sql)
    except sqlite3.Error as e:
        raise UsageError("bad --where %r: %s" % (args.where, e)) if args.where else e
    names = [c[0] for c in cur.description]
    f = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "csv":
            w = csv.writer(f)
            w.writerow(names)
            for r in cur:
                w.writerow([v.hex() if isinstance(v, bytes) else v for v in r])
        else:
            f.write("[")
            for i, r in enumerate(cur):
                f.write(("," if i else "") + "\n" + json.dumps(
                    {k: (v.hex() if isinstance(v, bytes) else v) for k, v in zip(names, r)}))
            f.write("\n]\n")
    finally:
        if args.out:
            f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
