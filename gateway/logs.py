"""Structured logs: one line per event, key=value (default) or JSON, on stderr.

Under systemd (stderr connected to the journal: $JOURNAL_STREAM names stderr's device and
inode) every line starts with its syslog priority, `<3>` error ... `<7>` debug (sd-daemon(3)),
so `journalctl -u edgeflow-gateway -p warning` shows warnings and errors only.
"""
import json
import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def journal_stream(stream):
    """True if stream is the journal's stdout/stderr pipe (systemd sets JOURNAL_STREAM=dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return want == "%d:%d" % (st.st_dev, st.st_ino)


class _Prio(logging.Formatter):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def format(self, r):
        return "<%d>%s" % (_PRIORITY.get(r.levelno, 6), self.inner.format(r))

log = logging.getLogger("edgeflow.gateway")


def event(level, name, **fields):
    """log.event(logging.INFO, 'checkpoint', rows=12, ms=0.4)"""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})


def info(name, **fields):
    event(logging.INFO, name, **fields)


def warning(name, **fields):
    event(logging.WARNING, name, **fields)


def error(name, **fields):
    event(logging.ERROR, name, **fields)


def _kv(v):
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return json.dumps(s)
    return s


class KvFormatter(logging.Formatter):
    def format(self, r):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.created)) + ".%03dZ" % r.msecs
        parts = ["ts=" + ts, "level=" + r.levelname.lower(), "event=" + _kv(r.getMessage())]
        parts += ["%s=%s" % (k, _kv(v)) for k, v in getattr(r, "fields", {}).items()]
        if r.exc_info:
            parts.append("exc=" + json.dumps(self.formatException(r.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, r):
        d = {"ts": r.created, "level": r.levelname.lower(), "event": r.getMessage()}
        d.update(getattr(r, "fields", {}))
        if r.exc_info:
            d["exc"] = self.formatException(r.exc_info)
        return json.dumps(d, default=str)


def setup(level="info", fmt="kv", stream=None):
    stream = stream or sys.stderr
    h = logging.StreamHandler(stream)
    f = JsonFormatter() if fmt == "json" else KvFormatter()
    h.setFormatter(_Prio(f) if journal_stream(stream) else f)
    log.handlers[:] = [h]
    log.setLevel(level.upper())
    log.propagate = False
