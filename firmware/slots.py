# A power-cut-safe two-slot store on flash, and a random u32 (firmware/identity.py's boot
# counter and the outbox's acked seqs use the slots; the board keeps this module, not identity).
#
# Slots: two small files <name>.0 / <name>.1, each `gen u32 | len u16 | payload | crc32 u32`.
# A write goes to the slot NOT holding the newest valid generation, so a power cut at any byte
# of a write leaves the previous generation intact; the reader takes the valid slot with the
# highest generation. One small write per update, no rename needed.
import struct
import binascii

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

_HDR = const(">IH")


class Slots:
    def __init__(self, fs, name):
        self.fs = fs
        self.name = name
        self.gen = 0
        self.slot = 1  # slot holding the newest generation (next write goes to the other)

    def _read(self, i):
        try:
            f = self.fs.open(self.name + "." + str(i), "rb")
        except OSError:
            return None
        try:
            data = f.read()
        finally:
            f.close()
        if len(data) < 10:
            return None
        gen, n = struct.unpack_from(_HDR, data, 0)
        if len(data) != 6 + n + 4:
            return None
        crc = struct.unpack_from(">I", data, 6 + n)[0]
        if binascii.crc32(data[:6 + n]) & 0xFFFFFFFF != crc:
            return None
        return gen, data[6:6 + n]

    def load(self):
        """Newest valid payload (bytes) or None."""
        best = None
        for i in (0, 1):
            r = self._read(i)
            if r is not None and (best is None or r[0] > best[0]):
                best = (r[0], r[1], i)
        if best is None:
            return None
        self.gen = best[0]
        self.slot = best[2]
        return best[1]

    def store(self, payload):
        gen = self.gen + 1
        slot = 1 - self.slot
        head = struct.pack(_HDR, gen, len(payload)) + payload
        data = head + struct.pack(">I", binascii.crc32(head) & 0xFFFFFFFF)
        f = self.fs.open(self.name + "." + str(slot), "wb")
        try:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
        finally:
            f.close()
        self.gen = gen
        self.slot = slot


def rand32():
    """A random non-zero u32: the hardware RNG where there is one (ESP32, CPython)."""
    import os
    try:
        b = os.urandom(4)
        v = (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]
    except AttributeError:  # MicroPython builds without os.urandom (the wasm port)
        import random
        v = random.getrandbits(32)
    return v or 1
