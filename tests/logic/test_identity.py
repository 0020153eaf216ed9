# Boot counter and two-slot CRC store (firmware/identity.py), both runtimes.
from firmware.identity import Identity, Slots
from firmware.hal_sim import MemFS, FailingFS, PowerCut


def test_boot_counter_increments_once_per_boot():
    fs = MemFS()
    b = [Identity(fs).boot for _ in range(5)]
    assert 1 <= b[0] < 1 << 29 and b == list(range(b[0], b[0] + 5))
    i = Identity(fs)
    assert [i.next_seq() for _ in range(3)] == [0, 1, 2]
    # two small writes per boot, one per slot
    assert sorted(fs.listdir()) == ["boot.0", "boot.1"]
    assert len(fs.files["boot.0"]) == 18


def test_power_cut_at_every_byte_of_the_counter_write():
    base = MemFS()
    b0 = Identity(base).boot
    for _ in range(2):
        Identity(base)  # boot b0 + 2 is durable
    probe = FailingFS(MemFS())
    Identity(probe)
    per_boot = probe.written
    for budget in range(per_boot + 1):
        fs = MemFS()
        fs.files = dict((k, bytearray(v)) for k, v in base.files.items())
        try:
            Identity(FailingFS(fs, budget))  # boot 4, power cut during its write
        except PowerCut:
            pass
        b = Identity(fs).boot
        # the interrupted boot produced no record, so reusing b0 + 3 is safe; never goes back
        assert b in (b0 + 3, b0 + 4), (budget, b)
        if budget >= per_boot:
            assert b == b0 + 4


def test_corrupt_slot_falls_back_to_the_other():
    fs = MemFS()
    b0 = Identity(fs).boot
    Identity(fs)  # boot b0 + 1 in both slots (generations 3 and 4)
    newest = "boot.1" if fs.files["boot.1"][3] == 4 else "boot.0"
    fs.files[newest][7] ^= 0xFF
    # a corrupted newest slot never brings back a used boot number (issue 11.6)
    assert Identity(fs).boot == b0 + 2


def test_boot_is_above_the_outbox_floor():
    fs = MemFS()
    b0 = Identity(fs).boot
    assert Identity(fs, floor=b0 + 7).boot == b0 + 8  # the outbox holds records of boot b0 + 7
    assert Identity(fs).boot == b0 + 9
    fresh = MemFS()  # erased slots, records still on flash: above them
    assert Identity(fresh, floor=(1 << 29) + 5).boot == (1 << 29) + 6


def test_slots_roundtrip_payload():
    fs = MemFS()
    s = Slots(fs, "x")
    assert s.load() is None
    s.store(b"abc")
    s.store(b"defg")
    s2 = Slots(fs, "x")
    assert s2.load() == b"defg"


def test_instance_id_made_once_and_kept():
    fs = MemFS()
    ids = [Identity(fs) for _ in range(3)]
    assert ids[0].instance and ids[0].instance == ids[1].instance == ids[2].instance
    assert 0 < ids[0].instance <= 0xFFFFFFFF
    # a re-flashed device (flash erased): a new instance and a new random first boot
    fs2 = MemFS()
    n = Identity(fs2)
    assert n.instance != ids[0].instance and n.boot != ids[0].boot


def test_old_four_byte_counter_gets_an_instance():
    fs = MemFS()
    Slots(fs, "boot").store(b"\x00\x00\x00\x07")
    i = Identity(fs)
    assert i.boot == 8 and i.instance
    assert Identity(fs).instance == i.instance
