"""The devices file: per-device secrets (written by edgeflow-provision, read here).

    {"version": 1, "devices": {"node-01": {"ack_key": "<64 hex>"}, ...}}

JSON, mode 0600 (refused if group or others may read it). More per-device fields may be
present (e.g. "channels", "units"); they are passed through. The ack key signs every ack
the gateway sends to that device and checks the MAC of its hellos (docs/wire.md).
"""
import json
import os
import stat

from shared import auth, wire

from .config import ConfigError

MAX_DEVICES = 1000000


def load_devices_file(path):
    """-> {device_id: {"ack_key": bytes, ...}}; ConfigError naming the problem otherwise."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError("devices file %s: %s" % (path, e.strerror))
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("devices file %s: mode %o lets others read the device secrets; chmod 600 it"
                          % (path, stat.S_IMODE(st.st_mode)))
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError("devices file %s: not readable JSON (%s)" % (path, e))
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("devices"), dict):
        raise ConfigError('devices file %s: must be {"version": 1, "devices": {id: {"ack_key": ...}}}' % path)
    devs = data["devices"]
    if len(devs) > MAX_DEVICES:
        raise ConfigError("devices file %s: more than %d devices" % (path, MAX_DEVICES))
    out = {}
    for dev, entry in devs.items():
        try:
            wire.check_device_id(dev)
        except wire.WireError:
            raise ConfigError("devices file %s: bad device id %r (1..32 of A-Z a-z 0-9 _ -)" % (path, dev))
        if not isinstance(entry, dict):
            raise ConfigError("devices file %s: devices.%s must be an object" % (path, dev))
        try:
            key = auth.parse_key(entry.get("ack_key"))
        except ValueError:
            raise ConfigError("devices file %s: devices.%s.ack_key must be 64 hex characters" % (path, dev))
        e = dict(entry)
        e["ack_key"] = key
        out[dev] = e
    return out


class Keys:
    """Ack keys by device id, as auth.Hmac objects made on first use (pads computed once)."""

    def __init__(self, devices=None):
        self.devices = devices  # None: insecure mode, acks carry no MAC
        self._hmac = {}

    @property
    def enabled(self):
        return self.devices is not None

    def known(self, dev):
        return self.devices is None or dev in self.devices

    def hmac(self, dev):
        """auth.Hmac of the device's key; None in insecure mode or for an unknown device."""
        if self.devices is None:
            return None
        h = self._hmac.get(dev)
        if h is None:
            e = self.devices.get(dev)
            if e is None:
                return None
            h = self._hmac[dev] = auth.Hmac(e["ack_key"])
        return h
