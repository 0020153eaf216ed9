# Device configuration (config.json at the board root): validation and defaults.
#
#   cfg = load(dict_or_json_text)  -> a new dict with every default filled in
#   raises ConfigError(path, reason): str(e) == "config.broker.port: must be ... (got ...)"
#
# Used at boot (errors printed on the serial console) and by tools/deploy.py before copying.
# Every field and default is listed in docs/firmware.md. Sections the edge pipeline owns
# (window, rules, anomaly, cep, ring, pipeline) are checked for type only and passed through.
import json

from shared import auth
from shared import wire_dev as wire  # the device side of the contract


class ConfigError(ValueError):
    def __init__(self, path, reason):
        super().__init__("config.%s: %s" % (path, reason))
        self.path = path
        self.reason = reason


try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

# RAM: the tables are const tuples: their strings are not interned (qstrs stay for good after
# this module is unloaded; docs/firmware.md, "RAM")
_CHANNELS = const(("temp", "hum", "pot"))
_KNOWN = const("temp, hum, pot")

# (section, key, kind, default, lo, hi); kind: int, bool, str
_FIELDS = const((
    ("broker", "port", "int", 1883, 1, 65535),
    ("broker", "keepalive_s", "int", 30, 5, 600),
    ("broker", "timeout_ms", "int", 5000, 500, 60000),
    ("raw", "send", "bool", True, None, None),
    ("raw", "every", "int", 1, 1, 3600),
    ("outbox", "max_bytes", "int", 262144, 4096, 16777216),
    ("outbox", "segment_bytes", "int", 8192, 256, 1048576),
    ("outbox", "batch_records", "int", 64, 1, 256),  # 64 / 20 s: flash life (docs/firmware.md)
    ("outbox", "batch_ms", "int", 20000, 0, 600000),
    ("outbox", "ack_persist_ms", "int", 10000, 0, 3600000),
    ("outbox", "dir", "str", "ob", 1, 16),
    ("uplink", "batch_max", "int", 50, 1, 1000),
    ("uplink", "resend_ms", "int", 30000, 1000, 3600000),
    ("uplink", "backoff_base_ms", "int", 1000, 10, 600000),
    ("uplink", "backoff_cap_ms", "int", 60000, 10, 3600000),
    ("uplink", "wifi_timeout_ms", "int", 20000, 1000, 600000),
    ("uplink", "max_inflight", "int", 16, 1, 256),
    ("clock", "ntp_host", "str", "pool.ntp.org", 0, 64),
    ("clock", "ntp_every_s", "int", 3600, 0, 604800),
    ("clock", "use_beacon", "bool", True, None, None),
    ("clock", "max_step_ms", "int", 1000, 10, 86400000),
))
_TOP = const((
    ("prefix", "str", "edgeflow", 1, 64),
    ("sample_ms", "int", 1000, 10, 3600000),
    ("status_every_s", "int", 60, 0, 86400),
    ("watchdog_ms", "int", 30000, 0, 600000),
    ("insecure", "bool", False, None, None),
))
_SECTIONS = const(("broker", "wifi", "raw", "outbox", "uplink", "clock"))
# sections the pipeline checks: (name, JSON types allowed: 1 object, 2 array, 4 integer, message)
_PASS = const((("window", 1, "must be a JSON object"), ("rules", 2, "must be a JSON array"),
               ("anomaly", 1, "must be a JSON object"), ("ring", 5, "must be a JSON object or integer"),
               ("count_window", 4, "must be a JSON integer")))


def _check(path, v, kind, lo, hi):
    if kind == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(path, "must be an integer (got %r)" % (v,))
        if v < lo or v > hi:
            raise ConfigError(path, "must be %d..%d (got %d)" % (lo, hi, v))
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(path, "must be true or false (got %r)" % (v,))
    elif kind == "str":
        if not isinstance(v, str):
            raise ConfigError(path, "must be a string (got %r)" % (v,))
        if len(v) < lo or len(v) > hi:
            raise ConfigError(path, "must be %d..%d characters (got %d)" % (lo, hi, len(v)))
    return v


def load(src):
    """Validate a config (dict or JSON text); returns a new dict with defaults filled in."""
    if isinstance(src, (bytes, bytearray)):
        src = bytes(src).decode()
    if isinstance(src, str):
        try:
            src = json.loads(src)
        except ValueError as e:
            raise ConfigError("json", "not valid JSON (%s)" % e)
    if not isinstance(src, dict):
        raise ConfigError("json", "must be a JSON object")
    for k in src:
        if not isinstance(k, str):
            raise ConfigError(repr(k), "keys must be strings")
        if k.startswith("_") or k == "device_id" or k in _SECTIONS or k in [t[0] for t in _PASS]:
            continue
        known = False
        for t in _TOP:
            if t[0] == k:
                known = True
        if k == "channels" or k == "ack_key":
            known = True
        if not known:
            raise ConfigError(k, "unknown field (typo?)")
    cfg = {}
    dev = src.get("device_id")
    if dev is None:
        raise ConfigError("device_id", "is required")
    try:
        wire.check_device_id(dev)
    except wire.WireError:
        raise ConfigError("device_id", "must be 1..32 of A-Z a-z 0-9 _ - (got %r)" % (dev,))
    cfg["device_id"] = dev
    # authenticated acks (docs/wire.md): 32-byte key as 64 hex chars, from edgeflow-provision
    key = src.get("ack_key")
    if key is not None:
        try:
            auth.parse_key(key)
        except ValueError:
            raise ConfigError("ack_key", "must be 64 hex characters (got %r)" % (key if not isinstance(key, str) else "%d characters" % len(key),))
        cfg["ack_key"] = key
    for key, kind, default, lo, hi in _TOP:
        cfg[key] = _check(key, src.get(key, default), kind, lo, hi)
    try:
        wire.check_topic_part(cfg["prefix"], "prefix", 64, True)
    except wire.WireError:
        raise ConfigError("prefix", "must be 1..64 of A-Z a-z 0-9 _ - / (got %r)" % (cfg["prefix"],))
    if cfg["watchdog_ms"] and cfg["watchdog_ms"] < 2000:
        raise ConfigError("watchdog_ms", "must be 0 (off) or >= 2000 (got %d)" % cfg["watchdog_ms"])
    # sections
    for sec in _SECTIONS:
        v = src.get(sec, {})
        if not isinstance(v, dict):
            raise ConfigError(sec, "must be an object")
        known = [f[1] for f in _FIELDS if f[0] == sec]
        if sec == "broker":
            known += ["host", "hosts", "user", "password", "client_id", "tls"]
        if sec == "wifi":
            known += ["ssid", "password"]
        for k in v:
            if k not in known:
                raise ConfigError(sec + "." + str(k), "unknown field (typo?)")
        cfg[sec] = {}
    for sec, key, kind, default, lo, hi in _FIELDS:
        cfg[sec][key] = _check(sec + "." + key, src.get(sec, {}).get(key, default), kind, lo, hi)
    b = src.get("broker", {})
    # broker.hosts: up to 8 of "host" or "host:port" -> [[host, port], ...] (after broker.host)
    v = b.get("hosts")
    hosts = []
    if v is not None and (not isinstance(v, list) or len(v) > 8):
        raise ConfigError("broker.hosts", "must be a list of at most 8 \"host\" or \"host:port\" (got %r)" % (v,))
    for i, h in enumerate(v or ()):
        where = "broker.hosts[%d]" % i
        if isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], int) and not isinstance(h[1], bool):
            h = h[0] + ":" + str(h[1])  # the loaded form [host, port]: a loaded config loads again
        if not isinstance(h, str):
            raise ConfigError(where, "must be a string (got %r)" % (h,))
        p = cfg["broker"]["port"]
        k = h.rfind(":")
        if k >= 0:
            try:
                p = int(h[k + 1:])
            except ValueError:
                p = 0
            h = h[:k]
            if not 1 <= p <= 65535:
                raise ConfigError(where, "port must be 1..65535 (got %r)" % (v[i],))
        if not h or len(h) > 253:
            raise ConfigError(where, "must be a host name or IP address (got %r)" % (v[i],))
        if [h, p] not in hosts:
            hosts.append([h, p])
    host = b.get("host")
    if host is None and hosts:  # no broker.host: the first of the list (and its port)
        host, cfg["broker"]["port"] = hosts[0]
    if not isinstance(host, str) or not host or len(host) > 253:
        raise ConfigError("broker.host", "is required: a host name or IP address (got %r)" % (host,))
    cfg["broker"]["host"] = host
    # brokers to fail over between (a NATS cluster's MQTT listeners): host first, then the list
    first = [host, cfg["broker"]["port"]]
    cfg["broker"]["hosts"] = [first] + [h for h in hosts if h != first]
    for k in ("user", "password"):
        if k in b:
            cfg["broker"][k] = _check("broker" + "." + k, b[k], "str", 0, 128)
    cid = b.get("client_id", dev)
    cfg["broker"]["client_id"] = _check("broker.client_id", cid, "str", 1, 64)
    # broker.tls = {"ca": "/ca.pem", "server_hostname": "name in the broker certificate"}.
    # Secure by default: TLS and MQTT credentials are required unless "insecure": true.
    bt = "broker" + "." + "tls"
    t = b.get("tls")
    if t is not None:
        if not isinstance(t, dict):
            raise ConfigError(bt, "must be an object {ca, server_hostname}")
        for k in t:
            if k not in ("ca", "server_hostname"):
                raise ConfigError(bt + "." + str(k), "unknown field (typo?)")
        ca = _check("broker.tls.ca", t.get("ca"), "str", 2, 64) if "ca" in t else None
        if ca is None or ca[0] != "/" or ".." in ca:
            raise ConfigError("broker.tls.ca", "must be the CA file's path on the board, like \"/ca.pem\" (got %r)"
                              % (ca,))
        name = _check("broker.tls.server_hostname", t.get("server_hostname", cfg["broker"]["host"]), "str", 1, 253)
        cfg["broker"]["tls"] = {"ca": ca, "server_hostname": name}
    if not cfg["insecure"]:
        if t is None:
            raise ConfigError(bt, "is required (TLS to the broker; edgeflow-provision writes it) "
                              "unless \"insecure\": true")
        if not b.get("user") or not b.get("password"):
            raise ConfigError("broker.user", "user and password are required (edgeflow-provision) "
                              "unless \"insecure\": true")
        if "ack_key" not in cfg:
            raise ConfigError("ack_key", "is required (authenticated acks; edgeflow-provision writes it) "
                              "unless \"insecure\": true")
    w = src.get("wifi", {})
    cfg["wifi"]["ssid"] = _check("wifi" + "." + "ssid", w.get("ssid", ""), "str", 0, 32)
    pw = _check("wifi.password", w.get("password", ""), "str", 0, 64)
    if pw and len(pw) < 8:
        raise ConfigError("wifi.password", "must be empty (open network) or 8..64 characters")
    cfg["wifi"]["password"] = pw
    ob = cfg["outbox"]
    if ob["segment_bytes"] * 2 > ob["max_bytes"]:
        raise ConfigError("outbox.segment_bytes", "must be at most half of outbox.max_bytes (%d)" % ob["max_bytes"])
    for c in ob["dir"]:
        if c not in wire._ID_CHARS:
            raise ConfigError("outbox" + "." + "dir", "must be a plain name of A-Z a-z 0-9 _ - (got %r)" % ob["dir"])
    up = cfg["uplink"]
    if up["backoff_cap_ms"] < up["backoff_base_ms"]:
        raise ConfigError("uplink.backoff_cap_ms", "must be >= uplink.backoff_base_ms")
    chans = src.get("channels", list(_CHANNELS))
    if isinstance(chans, dict):
        # {name: channel number on the wire}; names are the sensors the HAL knows
        for nm in chans:
            if nm not in _CHANNELS:
                raise ConfigError("channels" + "." + str(nm), "unknown channel (known: %s)" % _KNOWN)
            _check("channels" + "." + nm, chans[nm], "int", 0, 255)
        if not chans:
            raise ConfigError("channels", "no channel")
        cfg["channels"] = dict(chans)
    else:
        if not isinstance(chans, list) or not chans:
            raise ConfigError("channels", "must be a non-empty list of %s (or a {name: number} map)" % _KNOWN)
        seen = []
        for i in range(len(chans)):
            c = chans[i]
            if c not in _CHANNELS:
                raise ConfigError("channels[%d]" % i, "unknown channel %r (known: %s)" % (c, _KNOWN))
            if c in seen:
                raise ConfigError("channels[%d]" % i, "duplicate channel %r" % c)
            seen.append(c)
        cfg["channels"] = seen
    for k, types, msg in _PASS:
        if k in src:
            v = src[k]
            if isinstance(v, bool) or not ((types & 1 and isinstance(v, dict)) or (types & 2 and isinstance(v, list))
                                           or (types & 4 and isinstance(v, int))):
                raise ConfigError(k, msg)
            cfg[k] = v
    for k in src:
        if k.startswith("_"):
            cfg[k] = src[k]
    # the edge pipeline validates its own sections (window, rules, anomaly, ...): build it once
    try:
        from firmware.pipeline import Pipeline
    except ImportError:
        return cfg
    try:
        Pipeline(cfg, lambda *a: None)
    except ValueError as e:
        path = getattr(e, "rule_id", None) or "pipeline"
        if path not in ("window", "rules", "anomaly", "ring", "count_window", "channels") and "." not in path:
            path = "rules" + "." + path  # a rule id
        raise ConfigError(path, getattr(e, "reason", str(e)))
    return cfg


def channel_map(cfg):
    """[(name, wire channel number)] of a loaded config."""
    ch = cfg["channels"]
    if isinstance(ch, dict):
        return [(nm, n) for n, nm in sorted((n, nm) for nm, n in ch.items())]
    from firmware.hal import CHANNELS
    return [(nm, CHANNELS[nm]) for nm in ch]
