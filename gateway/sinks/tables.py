"""What sinks forward: the gateway's output tables, their columns and idempotency keys.

One outbox item carries rows of one table in the store's column order:
    {"v": 1, "site": "<site>", "table": "<table>", "rows": [[...], ...]}
Each row's idempotency key is its key columns: (device, boot, seq) for device records,
(scope, key, channel, start, revision) for window results. The item's own id (Nats-Msg-Id,
Idempotency-Key) is "<site>/<table>/<key of its first row>[+<rows>]": stable across resends
(the item is written once, in the checkpoint transaction) and unique (every row key lives in
exactly one item per sink).
"""

FORMAT_VERSION = 1

DEVICE_KEY = ("device", "boot", "seq")
WINDOW_KEY = ("scope", "key", "channel", "start", "revision")

# table -> (columns in store order, key columns, is an alert)
TABLES = {
    "readings": (("device", "boot", "seq", "t", "channel", "flags", "value"), DEVICE_KEY, False),
    "unsynced": (("device", "boot", "seq", "t_since_boot_ms", "kind", "channel", "flags", "value"),
                 DEVICE_KEY, False),
    "device_windows": (("device", "boot", "seq", "t", "flags", "channel", "size_ms", "count", "min", "max", "mean",
                        "std", "first_dt", "last_dt"), DEVICE_KEY, False),
    "cep_events": (("device", "boot", "seq", "t", "flags", "rule", "severity", "span_ms", "evidence"),
                   DEVICE_KEY, True),
    "anomalies": (("device", "boot", "seq", "t", "flags", "channel", "detector", "score", "value", "baseline"),
                  DEVICE_KEY, True),
    "device_status": (("device", "boot", "seq", "t", "flags", "uptime_s", "outbox_records", "outbox_bytes",
                       "dropped", "late", "clock_offset_ms", "free_mem", "reconnects"), DEVICE_KEY, False),
    "window_revisions": (("scope", "key", "channel", "start", "end", "revision", "count", "sum", "min", "max",
                          "mean", "std", "watermark"), WINDOW_KEY, False),
}

ALIASES = {
    "alerts": ("cep_events", "anomalies"),
    "windows": ("window_revisions",),
    "records": ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status"),
    "all": tuple(TABLES),
}


def expand(names, where):
    """Config list of tables/aliases -> tuple of table names in TABLES order."""
    from ..config import ConfigError
    want = set()
    for n in names:
        if n in ALIASES:
            want.update(ALIASES[n])
        elif n in TABLES:
            want.add(n)
        else:
            raise ConfigError("%s: unknown table %r (known: %s)" % (where, n, ", ".join(list(TABLES) + list(ALIASES))))
    return tuple(t for t in TABLES if t in want)


def key_index(table):
    cols, key, _ = TABLES[table]
    return tuple(cols.index(c) for c in key)


_KEYIDX = {t: key_index(t) for t in TABLES}


def row_key(table, row):
    return "/".join(str(row[i]) for i in _KEYIDX[table])


def item_id(site, table, rows):
    n = len(rows)
    k = "%s/%s/%s" % (site, table, row_key(table, rows[0]))
    return k if n == 1 else "%s+%d" % (k, n)
