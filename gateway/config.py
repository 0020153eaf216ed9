"""Gateway configuration: TOML file -> validated, typed sections with defaults.

Every key has a default, so an empty file (or none) runs against a broker on
127.0.0.1:1883. Unknown keys and wrong types are errors, reported with the
dotted key name so a typo never silently falls back to a default.
"""
import os

try:
    import tomllib
except ImportError:  # python < 3.11
    import tomli as tomllib

from shared import wire


class ConfigError(ValueError):
    pass


# section -> key -> (default, type, check or None, help). The help text also
# feeds docs/gateway.md's reference table.
SCHEMA = {
    "mqtt": {
        "host": ("127.0.0.1", str, None, "broker host"),
        "port": (1883, int, (1, 65535), "broker port"),
        "client_id": ("edgeflow-gateway", str, None, "fixed client id: the persistent session lives under it"),
        "prefix": ("edgeflow", str, None, "topic prefix (wire.Topics)"),
        "keepalive": (30, int, (5, 600), "MQTT keepalive seconds"),
        "queue_size": (1000, int, (10, 100000), "bounded ingest queue (messages); reading pauses when full"),
        "reconnect_max_s": (10.0, float, (0.1, 600), "cap of the reconnect backoff"),
        "username": ("", str, None, "MQTT user name (edgeflow-provision: gateway/gateway.toml); with the broker's use_username_as_clientid it is also the client id"),
        "password_file": ("", str, None, "file holding the MQTT password (mode 0600); env EDGEFLOW_MQTT_PASSWORD overrides it"),
        "tls_ca": ("", str, None, "CA certificate (PEM) the broker's certificate must chain to; empty = plaintext (needs [security] insecure)"),
        "tls_cert": ("", str, None, "client certificate (PEM) if the broker asks for one"),
        "tls_key": ("", str, None, "private key of tls_cert"),
        "tls_server_name": ("", str, None, "name checked in the broker's certificate (default: host)"),
    },
    "devices": {
        "file": ("", str, None, "device registry (JSON, 0600: ids and ack keys, from edgeflow-provision); env EDGEFLOW_DEVICES_FILE overrides it; data from other ids is quarantined as unprovisioned"),
    },
    "security": {
        "insecure": (False, bool, None, "allow running without TLS, MQTT credentials or a devices file (tests of that set-up only)"),
    },
    "store": {
        "path": ("edgeflow.db", str, None, "SQLite database file"),
        "synchronous": ("FULL", str, ("NORMAL", "FULL"), "SQLite synchronous mode in WAL (FULL: acked records survive power loss)"),
        "retain_readings": (True, bool, None, "keep every raw reading in table readings"),
        "index_readings": (False, bool, None, "also index raw readings row by row on (device, t); per-device time ranges and retention use reading_spans without it; costs insert speed"),
    },
    "checkpoint": {
        "interval_ms": (200, int, (1, 60000), "commit at least this often when there is pending work"),
        "max_records": (50000, int, (1, 10000000), "commit when this many records are pending"),
        "max_messages": (400, int, (1, 100000), "commit when this many MQTT messages await their PUBACK (keep below the broker's max_inflight_messages)"),
        "ahead_messages": (3200, int, (1, 1000000), "while a commit is in flight keep processing until this many messages (or twice max_records rows to write) are pending; the next commit takes them all (group commit). The broker's max_inflight_messages caps it over MQTT"),
        "ack_interval_ms": (100, int, (0, 60000), "at most one ack per device per interval; acks in between are merged (they are cumulative)"),
    },
    "dedup": {
        "window": (4096, int, (64, 1 << 20), "seq bitmap above the contiguous high-water mark, per (device, boot)"),
        "max_boots": (16, int, (1, 1024), "boots tracked per device; the oldest beyond this is retired"),
    },
    "watermark": {
        "out_of_orderness_ms": (5000, int, (0, 1 << 40), "bounded out-of-orderness: device watermark = max_t - this - 1"),
        "idle_timeout_ms": (60000, int, (1, 1 << 40), "processing time without data after which a device leaves the global minimum"),
    },
    "windows": {
        "size_ms": (60000, int, (1, 1 << 40), "tumbling window size"),
        "offset_ms": (0, int, (0, 1 << 40), "window alignment offset from the epoch"),
        "allowed_lateness_ms": (60000, int, (0, 1 << 40), "late records within this amend a fired window (revision 1, 2, ...)"),
        "groups": ([], list, None, "list of {name, devices (list or ['*']), channel}: windows over several devices"),
    },
    "admission": {
        "replay_rate": (500000.0, float, (1, 1e9), "backlog records per second granted to replaying devices (token bucket); with adaptive: the starting rate and the ceiling"),
        "adaptive": (True, bool, None, "adapt the replay rate to the measured committed records/s and the expected wait of granted backlog"),
        "replay_rate_min": (2000.0, float, (1, 1e9), "adaptive: the rate never goes below this (records/s)"),
        "latency_target_s": (5.0, float, (0.1, 3600), "adaptive: back off when granted backlog would wait longer than this (keep well below the devices' resend timer, 30 s)"),
        "backoff": (0.8, float, (0.1, 0.99), "adaptive: on congestion rate = max(rate / 2, backoff x min(rate, committed records/s))"),
        "increase": (0.05, float, (0.0, 1.0), "adaptive: while the wait is under half the target, add this fraction of replay_rate per second"),
        "growth": (2.0, float, (1.0, 100.0), "adaptive: while the wait is under a quarter of the target, multiply the rate by this per second, up to growth x committed records/s (if that adds more than increase)"),
        "replay_burst": (100000, int, (1, 1 << 40), "token bucket capacity"),
        "max_replayers": (32, int, (1, 1 << 20), "devices replaying backlog at once; others wait"),
        "credit_chunk": (2000, int, (1, 1 << 31), "most credits outstanding per replayer"),
        "replay_timeout_s": (30.0, float, (0.1, 86400), "a replayer that sends no backlog for this long loses its slot"),
        "first_byte_s": (3.0, float, (0.1, 3600), "a replayer that sends no backlog at all this long after its first grant loses its slot and waits behind devices that send (fake or dead replayers)"),
        "pause_queue_fraction": (0.5, float, (0.0, 1.0), "no new credits while the ingest queue is fuller than this"),
    },
    "time": {
        "max_future_ms": (wire.MAX_FUTURE_MS, int, (0, 1 << 40), "event times further ahead of the gateway clock are quarantined"),
    },
    "limits": {
        "max_devices": (20000, int, (1, 1 << 24), "device ids the gateway tracks; input from further new ids is refused (quarantine reason too_many_devices)"),
        "quarantine_payload_bytes": (1024, int, (0, wire.MAX_PAYLOAD), "bytes of a bad message kept in its quarantine row (the digest covers all of it)"),
        "quarantine_max_rows": (100000, int, (1, 1 << 40), "quarantine keeps the newest this many rows; older ones are deleted (counted)"),
    },
    "metrics": {
        "port": (9108, int, (0, 65535), "Prometheus endpoint port; 0 disables it"),
        "host": ("127.0.0.1", str, None, "Prometheus endpoint address"),
        "health_max_commit_age_s": (30.0, float, (1.0, 86400.0), "/healthz fails when work is pending and no commit succeeded for this long"),
        "device_series_max": (100, int, (0, 1 << 20), "per-device gauges (watermark lag) only for this many devices, the most lagging; the rest are in the fleet-wide gauges (10,000 devices' series took 0.3-0.4 s of the gateway's CPU per scrape)"),
    },
    "web": {
        "port": (8088, int, (0, 65535), "live web view port (fleet, plots, alerts); 0 disables it"),
        "host": ("127.0.0.1", str, None, "web view address; anything but loopback requires web.token_sha256"),
        "token_sha256": ("", str, None, "SHA-256 hex of the access token (edgeflow-gateway web-token makes one); env EDGEFLOW_WEB_TOKEN_SHA256"),
        "tls_cert": ("", str, None, "PEM certificate: serve HTTPS (with tls_key)"),
        "tls_key": ("", str, None, "PEM private key for tls_cert"),
        "update_ms": (1000, int, (100, 60000), "how often open pages get new data"),
        "history_points": (300, int, (10, 5000), "window results per device and channel a page keeps"),
    },
    "retention": {
        "readings_days": (0.0, float, (0.0, 36500.0), "delete raw readings older than this (event time); 0 keeps them forever"),
        "results_days": (0.0, float, (0.0, 36500.0), "delete window results, device windows and status older than this; 0 keeps them"),
        "events_days": (0.0, float, (0.0, 36500.0), "delete alerts, late, quarantine, gap and unsynced rows older than this; 0 keeps them"),
        "batch_rows": (5000, int, (100, 1000000), "rows deleted per statement (short transactions between checkpoints)"),
        "interval_s": (60.0, float, (0.1, 86400.0), "how often retention runs"),
    },
    "sinks": {  # downstream delivery (gateway/sinks, docs/sinks.md)
        "site": ("site", str, None, "this site's id in every forwarded item and key (1..64 of [A-Za-z0-9_-])"),
        "outbox_max_items": (5000000, int, (1, 1 << 40), "default per-sink outbox bound, result rows"),
        "outbox_max_bytes": (512 << 20, int, (1024, 1 << 50), "default per-sink outbox bound, bytes"),
        "sink": ([], list, None, "list of sinks [[sinks.sink]]: name, type (jetstream/webhook/mqtt), tables, ..."),
    },
    "log": {
        "level": ("info", str, ("debug", "info", "warning", "error"), "log level"),
        "format": ("kv", str, ("kv", "json"), "key=value or JSON lines on stderr"),
    },
}


class Section:
    def __init__(self, name, values):
        self._name = name
        for k, v in values.items():
            setattr(self, k, v)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self):
        return "Section(%s, %r)" % (self._name, self.as_dict())


class Group:
    __slots__ = ("name", "devices", "channel")

    def __init__(self, name, devices, channel):
        self.name, self.devices, self.channel = name, devices, channel

    def matches(self, dev):
        return self.devices is None or dev in self.devices


class Config:
    """Typed view: cfg.mqtt.host, cfg.store.path, cfg.windows.groups (list of Group) ..."""

    def __init__(self, data=None):
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError("config must be a table")
        data = dict(data)
        self.channels = _channels(data.pop("channels", {}))
        for sec in data:
            if sec not in SCHEMA:
                raise ConfigError("unknown section [%s] (known: %s)" % (sec, ", ".join(SCHEMA)))
        for sec, keys in SCHEMA.items():
            given = data.get(sec, {})
            if not isinstance(given, dict):
                raise ConfigError("[%s] must be a table" % sec)
            for k in given:
                if k not in keys:
                    raise ConfigError("unknown key %s.%s (known: %s)" % (sec, k, ", ".join(keys)))
            vals = {}
            for k, (default, typ, check, _help) in keys.items():
                v = given.get(k, default)
                vals[k] = _check("%s.%s" % (sec, k), v, typ, check)
            setattr(self, sec, Section(sec, vals))
        self.windows.groups = _groups(self.windows.groups)
        env_hash = os.environ.get("EDGEFLOW_WEB_TOKEN_SHA256")
        if env_hash:
            self.web.token_sha256 = env_hash
        _check_web(self.web)
        keep = self.retention.results_days * 86400000
        if keep and keep <= self.windows.size_ms + self.windows.allowed_lateness_ms:
            raise ConfigError("retention.results_days must keep results longer than a window can still be revised "
                              "(windows.size_ms + windows.allowed_lateness_ms = %d ms)"
                              % (self.windows.size_ms + self.windows.allowed_lateness_ms))
        from .sinks import parse as _parse_sinks  # sinks' own keys are checked there
        self.sinks.sink = _parse_sinks(self.sinks.sink, self.sinks.as_dict())
        if self.store.synchronous not in ("NORMAL", "FULL"):
            raise ConfigError("store.synchronous must be NORMAL or FULL")
        try:
            wire.Topics(self.mqtt.prefix)
        except wire.WireError as e:
            raise ConfigError("mqtt.prefix: %s" % e)
        env = os.environ.get("EDGEFLOW_DEVICES_FILE")
        if env:
            self.devices.file = env
        if bool(self.mqtt.tls_cert) != bool(self.mqtt.tls_key):
            raise ConfigError("mqtt.tls_cert and mqtt.tls_key go together")

    def mqtt_password(self):
        """The MQTT password: env EDGEFLOW_MQTT_PASSWORD, else the first line of mqtt.password_file."""
        env = os.environ.get("EDGEFLOW_MQTT_PASSWORD")
        if env:
            return env
        if not self.mqtt.password_file:
            return None
        try:
            with open(self.mqtt.password_file) as f:
                return f.readline().strip()
        except OSError as e:
            raise ConfigError("mqtt.password_file: cannot read %s (%s)" % (self.mqtt.password_file, e.strerror))

    def security_problems(self):
        """What keeps this config from the secure set-up (empty when it is secure)."""
        out = []
        if not self.mqtt.tls_ca:
            out.append("mqtt.tls_ca (TLS to the broker)")
        if not self.mqtt.username:
            out.append("mqtt.username")
        if not (os.environ.get("EDGEFLOW_MQTT_PASSWORD") or self.mqtt.password_file):
            out.append("mqtt.password_file or env EDGEFLOW_MQTT_PASSWORD")
        if not self.devices.file:
            out.append("devices.file (the device registry) or env EDGEFLOW_DEVICES_FILE")
        return out

    def check_secure(self):
        """Refuse an insecure set-up unless [security] insecure = true says it is meant."""
        missing = self.security_problems()
        if missing and not self.security.insecure:
            raise ConfigError("refusing to run without %s: run edgeflow-provision (docs/security.md) "
                              "or set [security] insecure = true" % ", ".join(missing))

    @classmethod
    def load(cls, path=None, overrides=None):
        data = {}
        if path:
            if not os.path.exists(path):
                raise ConfigError("config file not found: %s" % path)
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError("%s: %s" % (path, e))
        for dotted, v in (overrides or {}).items():
            sec, key = dotted.split(".", 1)
            data.setdefault(sec, {})[key] = v
        return cls(data)

    def as_dict(self):
        out = {sec: getattr(self, sec).as_dict() for sec in SCHEMA}
        out["channels"] = {("%s/%d" % k if k[0] != "*" else str(k[1])): {"name": n, "unit": u}
                           for k, (n, u) in sorted(self.channels.items())}
        if out["web"]["token_sha256"]:
            out["web"]["token_sha256"] = "(set)"
        out["windows"]["groups"] = [{"name": g.name, "devices": sorted(g.devices) if g.devices else ["*"],
                                     "channel": g.channel} for g in self.windows.groups]
        return out


def _check(name, v, typ, check):
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise ConfigError("%s must be %s, got %r" % (name, typ.__name__, v))
    if isinstance(check, tuple) and typ in (int, float):
        lo, hi = check
        if not lo <= v <= hi:
            raise ConfigError("%s must be within %s..%s, got %r" % (name, lo, hi, v))
    elif isinstance(check, tuple) and typ is str and v not in check and v.upper() not in check:
        raise ConfigError("%s must be one of %s, got %r" % (name, "/".join(check), v))
    if typ is str and check and check[0].isupper():
        v = v.upper()
    return v


def _groups(raw):
    out, seen = [], set()
    for i, g in enumerate(raw):
        where = "windows.groups[%d]" % i
        if not isinstance(g, dict):
            raise ConfigError(where + " must be a table {name, devices, channel}")
        extra = set(g) - {"name", "devices", "channel"}
        if extra:
            raise ConfigError("%s: unknown keys %s" % (where, ", ".join(sorted(extra))))
        name = g.get("name")
        try:
            wire.check_topic_part(name, "group", 64)
        except wire.WireError:
            raise ConfigError(where + ".name must be 1..64 of [A-Za-z0-9_-], got %r" % (name,))
        if name in seen:
            raise ConfigError("%s: duplicate group name %r" % (where, name))
        seen.add(name)
        devs = g.get("devices", ["*"])
        if not isinstance(devs, list) or not devs or not all(isinstance(d, str) for d in devs):
            raise ConfigError(where + ".devices must be a non-empty list of device ids or ['*']")
        if "*" in devs:
            devs = None
        else:
            for d in devs:
                try:
                    wire.check_device_id(d)
                except wire.WireError:
                    raise ConfigError("%s.devices: bad device id %r" % (where, d))
            devs = frozenset(devs)
        ch = g.get("channel")
        if not isinstance(ch, int) or isinstance(ch, bool) or not 0 <= ch <= 255:
            raise ConfigError(where + ".channel must be an integer 0..255")
        out.append(Group(name, devs, ch))
    return out


# Channel names and units of the firmware's HAL (firmware/hal.py); values are fixed point x1000.
DEFAULT_CHANNELS = {0: ("temp", "degC"), 1: ("hum", "%RH"), 2: ("pot", "%")}


def _channel_entry(where, v):
    if not isinstance(v, dict) or set(v) - {"name", "unit"} or not isinstance(v.get("name"), str) \
            or not isinstance(v.get("unit", ""), str) or not 0 < len(v["name"]) <= 64 or len(v.get("unit", "")) > 32:
        raise ConfigError("%s must be {name = \"...\" (1..64 chars), unit = \"...\" (0..32 chars)}" % where)
    return v["name"], v.get("unit", "")


def _channel_no(where, k):
    if not (isinstance(k, str) and k.isdigit() and int(k) <= 255):
        raise ConfigError("%s: channel key must be a number 0..255, got %r" % (where, k))
    return int(k)


def _channels(raw):
    """[channels] 0 = {name, unit} for every device; [channels.device.ID] for one device.
    Returns {(device or '*', channel): (name, unit)}, starting from the HAL's channels."""
    if not isinstance(raw, dict):
        raise ConfigError("[channels] must be a table")
    out = {("*", ch): nu for ch, nu in DEFAULT_CHANNELS.items()}
    for k, v in raw.items():
        if k == "device":
            if not isinstance(v, dict):
                raise ConfigError("channels.device must be a table of device ids")
            for dev, m in v.items():
                try:
                    wire.check_device_id(dev)
                except wire.WireError:
                    raise ConfigError("channels.device: bad device id %r" % dev)
                if not isinstance(m, dict):
                    raise ConfigError("channels.device.%s must be a table" % dev)
                for ck, cv in m.items():
                    where = "channels.device.%s.%s" % (dev, ck)
                    out[(dev, _channel_no(where, ck))] = _channel_entry(where, cv)
        else:
            out[("*", _channel_no("channels", k))] = _channel_entry("channels.%s" % k, v)
    return out


def _check_web(w):
    if w.token_sha256:
        h = w.token_sha256.strip().lower()
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise ConfigError("web.token_sha256 must be 64 hex chars (edgeflow-gateway web-token prints one)")
        w.token_sha256 = h
    if w.port and not w.token_sha256 and w.host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError("web.host = %r exposes the web view: set web.token_sha256 (edgeflow-gateway web-token) "
                          "or bind it to 127.0.0.1" % w.host)
    if bool(w.tls_cert) != bool(w.tls_key):
        raise ConfigError("web.tls_cert and web.tls_key go together")
