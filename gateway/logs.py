"""Structured logs: one line per event, key=value (default) or JSON, on stderr."""
import json
import logging
import sys
import time

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
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    log.handlers[:] = [h]
    log.setLevel(level.upper())
    log.propagate = False
