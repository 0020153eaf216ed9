# The wire contract, device side, boot and connect time: topic names and the hello. The board
# imports it at boot and for each hello and unloads it after (RAM: docs/firmware.md); the
# steady data path is shared/wire_dev.py, shared/wire.py re-exports both (one contract).
import struct

from shared.auth import Hmac, MAC_LEN
from shared.wire_dev import WireError, MAX_FW, MSG_HELLO, check_topic_part, _header, _u32

_HELLO = ">IIIIIB"  # backlog records, floor boot, floor seq, instance, nonce, fw length; fw, MAC follow


# ---------------------------------------------------------------- topics


class Topics:
    """Topic layout under a prefix (default 'edgeflow').

    device -> gateway: {p}/d/{id}/data (QoS 1), {p}/d/{id}/hello (QoS 1),
                       {p}/d/{id}/state (retained; 'offline' is the last will)
    gateway -> device: {p}/d/{id}/ack (QoS 1), {p}/gw/state (retained; last will)
    The gateway's subscriptions and parse() are in shared/wire.py's Topics (not on the board).
    """

    # the topic formats are longer than 10 characters: not interned, so the board keeps none
    # of them after it unloads this module (RAM)
    def __init__(self, prefix="edgeflow"):
        check_topic_part(prefix, "prefix", 64, True)
        self.prefix = prefix
        self.gw_state = "%s/gw/state" % prefix

    def data(self, dev):
        return "%s/d/%s/data" % (self.prefix, dev)

    def hello(self, dev):
        return "%s/d/%s/hello" % (self.prefix, dev)

    def state(self, dev):
        return "%s/d/%s/state" % (self.prefix, dev)

    def ack(self, dev):
        return "%s/d/%s/ack" % (self.prefix, dev)


def _mac(key, args):
    """MAC_LEN bytes over the byte strings args; zeros without a key (insecure mode: the
    receiver has no key either)."""
    if key is None:
        return bytes(MAC_LEN)
    if not isinstance(key, Hmac):
        key = Hmac(key)
    return key.mac(*args)


def encode_hello(device_id, boot, next_seq, now_ms, backlog, floor_boot, floor_seq, instance, nonce, fw,
                 key=None, flags=0):
    """Device birth, sent on every connect. floor: the oldest (boot, seq) the device still holds
    anywhere (docs/wire.md "The hello contract"); instance: random id of this flash identity;
    nonce: fresh per hello, echoed in every ack. The MAC covers every byte before it."""
    fwb = fw.encode()
    if len(fwb) > MAX_FW:
        raise WireError("bad_fw", fw)
    body = (_header(MSG_HELLO, device_id, boot, next_seq, now_ms, flags)
            + struct.pack(_HELLO, _u32(backlog, "backlog"), _u32(floor_boot, "boot"), _u32(floor_seq, "seq"),
                          _u32(instance, "instance"), _u32(nonce, "nonce"), len(fwb)) + fwb)
    return body + _mac(key, (body,))
