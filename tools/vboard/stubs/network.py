"""virtual board stub, not hardware: the `network` module of the edgeflow virtual board.

The virtual board has no Wi-Fi: a WLAN interface can be activated and configured but never
connects. Exists only so firmware modules import on the virtual board (tools/vboard/).
"""
STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
VIRTUAL = True


def hostname(name=None):
    return "edgeflow-vboard"


class WLAN:
    def __init__(self, interface_id=STA_IF):
        self._active = False
        self._ssid = None

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)

    def connect(self, ssid=None, key=None, **kw):
        self._ssid = ssid

    def disconnect(self):
        pass

    def isconnected(self):
        return False

    def status(self, param=None):
        if param == "rssi":
            return -100
        return STAT_NO_AP_FOUND if self._ssid else STAT_IDLE

    def ifconfig(self, cfg=None):
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kw):
        if args:
            if args[0] == "mac":
                return b"\x02\x00\x00\x00\x00\x01"
            return None

    def scan(self):
        return []
