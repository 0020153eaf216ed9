# Device identity on flash: the boot counter and instance id, and a power-cut-safe two-slot store.
#
# Slots: two small files <name>.0 / <name>.1, each `gen u32 | len u16 | payload | crc32 u32`.
# A write goes to the slot NOT holding the newest valid generation, so a power cut at any byte
# of a write leaves the previous generation intact; the reader takes the valid slot with the
# highest generation. One small write per update, no rename needed.
import struct
import binascii

_HDR = ">IH"


class Slots:
    def __init__(self, fs, name):
        self.fs = fs
        self.name = name
        self.gen = 0
        self.slot = 1  # slot holding the newest generation (next write goes to the other)

    def _read(self, i):
        try:
            f = self.fs.open("%s.%d" % (self.name, i), "rb")
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
        f = self.fs.open("%s.%d" % (self.name, slot), "wb")
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


class Identity:
    """The flash boot counter and instance id. `Identity(fs).boot` is this boot's number (random
    below 2**29 on a fresh device, then +1 per boot); `.instance` a random u32 made when the counter slots are created (a fresh or
    re-flashed device gets a new one; docs/wire.md "Instance id"), kept for the device's life.

    The boot is one more than the highest boot found in either counter slot and `floor` (the
    highest boot the outbox still holds records of: Outbox.highest_boot), and it is written to
    both slots, so a slot corrupted later (not by a power cut) never brings back a used number.
    If the power is cut while the counter is written, the old value stays valid and that
    aborted boot produced no records, so reusing its number is safe.
    """

    def __init__(self, fs, name="boot", floor=0):
        self.slots = Slots(fs, name)
        raw = self.slots.load()
        inst = struct.unpack(">I", raw[4:])[0] if raw is not None and len(raw) == 8 else 0
        prev = floor
        for i in (0, 1):
            r = self.slots._read(i)
            if r is not None and len(r[1]) in (4, 8):
                b = struct.unpack(">I", r[1][:4])[0]
                if b > prev:
                    prev = b
        self.instance = inst or rand32()  # a 4-byte slot (older firmware) gets one now
        if raw is None:
            # fresh (or erased) flash: start at a random boot below 2**29 (small ints on the
            # ESP32), so a re-flashed device does not reuse the boot numbers, and with them
            # the (device, boot, seq) identities, of its earlier life (docs/wire.md); above
            # any boot the outbox still holds
            b = rand32() & 0x1FFFFFFF or 1
            self.boot = b if b > floor else (floor + 1) & 0xFFFFFFFF or 1
        else:
            self.boot = (prev + 1) & 0xFFFFFFFF or 1
        data = struct.pack(">II", self.boot, self.instance)
        self.slots.store(data)
        self.slots.store(data)  # both slots: either one alone still knows this boot
        self.seq = 0

    def next_seq(self):
        s = self.seq
        self.seq = s + 1
        return s
