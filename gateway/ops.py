"""Operations beside the data path: the web view, retention, and systemd's notify/watchdog.

All of it runs on the gateway's loop and none of it may stop the data path: a web view
that cannot bind is logged and skipped; retention deletes in bounded statements queued
between checkpoints; the watchdog is fed only while the loop turns and commits succeed.
"""
import asyncio
import os
import time

from . import logs, metrics

try:
    import sdnotify
except ImportError:  # optional: only systemd's Type=notify uses it
    sdnotify = None


class Notifier:
    """sd_notify(3) through the sdnotify package; a no-op outside systemd (no NOTIFY_SOCKET)."""

    def __init__(self):
        self.n = sdnotify.SystemdNotifier() if sdnotify is not None and os.environ.get("NOTIFY_SOCKET") else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ok = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if ok else None

    def notify(self, msg):
        if self.n is not None:
            self.n.notify(msg)


def channel_map(cfg, devices=None):
    """Channel names and units: [channels] of the config, then a device's own "channels"
    in the devices file ({"0": {"name": "temp", "unit": "degC"}}, docs/operations.md)."""
    from .config import ConfigError, _channel_entry, _channel_no
    out = dict(cfg.channels)
    for dev, entry in sorted((devices or {}).items()):
        chans = entry.get("channels")
        if chans is None:
            continue
        if not isinstance(chans, dict):
            raise ConfigError("devices file: devices.%s.channels must be an object {\"0\": {name, unit}}" % dev)
        for k, v in chans.items():
            where = "devices file: devices.%s.channels.%s" % (dev, k)
            out[(dev, _channel_no(where, k))] = _channel_entry(where, v)
    return out


async def start_web(gw):
    w = gw.cfg.web
    if not w.port:
        return None
    from .web import WebView
    view = WebView(gw)
    try:
        await view.start()
    except (OSError, ValueError) as e:
        logs.error("web_failed", host=w.host, port=w.port, error=str(e))
        view.hist.close()
        return None
    logs.info("web_started", url=view.url, token=bool(w.token_sha256))
    if not w.tls_cert and w.host not in ("127.0.0.1", "::1", "localhost"):
        logs.warning("web_without_tls", detail="the token crosses the network in clear: set web.tls_cert/tls_key")
    return view


async def stop(gw):
    if gw._ops_task is not None:
        gw._ops_task.cancel()
    if gw.web is not None:
        try:
            await gw.web.stop()
        except Exception as e:  # noqa: BLE001 - shutting down: report, go on with the final checkpoint
            logs.warning("web_stop_failed", error=repr(e))
        gw.web = None


def cutoffs(cfg, now_ms):
    r = cfg.retention
    return {k: now_ms - int(getattr(r, k) * 86400000) for k in ("readings_days", "results_days", "events_days")
            if getattr(r, k) > 0}


async def ops_loop(gw):
    """Each second: READY once, WATCHDOG=1 while healthy, retention every retention.interval_s."""
    n = Notifier()
    n.notify("READY=1")
    r = gw.cfg.retention
    next_prune = time.monotonic() + min(r.interval_s, 5.0)
    tick = 1.0 if n.watchdog_s is None else min(1.0, n.watchdog_s / 3)
    try:
        while True:
            await asyncio.sleep(tick)
            ok, why = metrics.health(gw, gw.cfg.metrics.health_max_commit_age_s)
            stuck = [w for w in why if not w.startswith("broker")]  # a broker outage is not ours to restart
            if not stuck:
                n.notify("WATCHDOG=1")
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + r.interval_s
                cut = cutoffs(gw.cfg, int(time.time() * 1000))
                if cut:
                    await prune(gw, cut)
    finally:
        n.notify("STOPPING=1")


async def prune(gw, cut):
    t0 = time.perf_counter()
    try:
        deleted = await gw.store.prune(cut, gw.cfg.retention.batch_rows)
    except Exception as e:  # noqa: BLE001 - a failed delete loses nothing: retried next interval
        logs.warning("retention_failed", error=repr(e))
        return {}
    rd = gw.stats.retention_deleted
    for t, k in deleted.items():
        rd[t] = rd.get(t, 0) + k
    if deleted:
        logs.info("retention", seconds=round(time.perf_counter() - t0, 3),
                  **{t: k for t, k in sorted(deleted.items())})
    return deleted
