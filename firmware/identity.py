# Device identity on flash: the boot counter and instance id (boot only: firmware.app.build
# unloads this module; the two-slot store and rand32 are in firmware/slots.py).
import struct

from firmware.slots import Slots, rand32  # noqa: F401 (re-exported)


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
