"""The gateway's side of the hello contract and authenticated acks (docs/wire.md), no broker:
hellos are checked (MAC, nonce, floor, instance, staleness) before they change anything; a
re-flashed device starts a new incarnation; acks are signed and carry the latest nonce."""
import json
import os

from shared import auth, wire
from tests.test_gateway_pipeline import T0, TOP, cfg, deliver, flush, open_gw, readings, run

KEY = bytes(range(32))


def devices_file(tmp_path, ids=("n1",)):
    path = str(tmp_path / "devices.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "devices": {d: {"ack_key": KEY.hex()} for d in ids}}, f)
    return path


def hello(boot, next_seq, floor=None, instance=0xA1, nonce=7, key=KEY, dev="n1", backlog=0):
    fb, fs = floor if floor is not None else (boot, next_seq)
    return wire.encode_hello(dev, boot, next_seq, 0, backlog, fb, fs, instance, nonce, "fw", key)


def acks_of(gw, dev="n1"):
    """(decoded ack, MAC ok under KEY) of every ack published to dev."""
    k = auth.Hmac(KEY)
    return [(wire.decode_ack(p), wire.ack_mac_ok(p, dev.encode(), k)) for t, p in gw.ingest.published
            if t == TOP.ack(dev)]


def test_hellos_are_checked_before_they_change_anything(tmp_path):
    c = cfg(tmp_path, devices={"file": devices_file(tmp_path)})

    async def go():
        gw = await open_gw(c)
        deliver(gw, TOP.hello("n1"), hello(5, 100))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 5, readings(100, 10, T0)))
        await flush(gw)
        (a, ok), = acks_of(gw)
        assert ok and a[:2] == (5, 109) and a[6] == 7  # signed, carries the hello's nonce
        bad = [
            (hello(5, 200, key=b"x" * 32), "bad_mac"),  # forged: would retire up to 199
            (hello(5, 200, key=None), "bad_mac"),  # unsigned (insecure device)
            (hello(5, 200, nonce=0), "bad_nonce"),
            (hello(5, 200, floor=(5, 201)), "bad_floor"),
            (hello(5, 50, nonce=8), "stale_hello"),  # older position than the last accepted
            (hello(6, 0, dev="n2"), "unprovisioned"),
        ]
        for p, why in bad:
            deliver(gw, TOP.hello("n2" if why == "unprovisioned" else "n1"), p)
        await flush(gw)
        q = dict(gw.stats.quarantined)
        for _p, why in bad:
            assert q.get(why, 0) >= 1, (why, q)
        assert gw.dedup.hwm("n1", 5) == 109 and gw.dedup.nonce("n1") == 7 and gw.stats.hellos == 1
        await gw.store.close()
    run(go())


def test_reflash_starts_a_new_incarnation_and_old_acks_die(tmp_path):
    c = cfg(tmp_path, devices={"file": devices_file(tmp_path)})

    async def go():
        gw = await open_gw(c)
        deliver(gw, TOP.hello("n1"), hello(7, 0, instance=0xA1, nonce=1))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 7, readings(0, 50, T0)))
        deliver(gw, TOP.hello("n1"), hello(8, 0, instance=0xA1, nonce=2))
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 8, readings(0, 50, T0 + 5000)))
        await flush(gw)
        assert gw.dedup.min_boot("n1") == 8
        # data of the old flash still in the commit pipeline when the new flash says hello
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 8, readings(50, 10, T0 + 10000)))
        await gw.checkpoint()  # commit running: its acks (boot 8 up to 59) are for the old flash
        gw.ingest.published.clear()
        deliver(gw, TOP.hello("n1"), hello(3, 0, instance=0xB2, nonce=9))  # erased: boot 3 < 8
        await flush(gw)
        assert all(a[6] == 9 for a, ok in acks_of(gw)) and not [a for a, ok in acks_of(gw) if a[0] == 8]
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 3, readings(0, 20, T0 + 20000)))
        await flush(gw)
        assert gw.stats.readings == 130 and gw.stats.duplicates == 0  # boot 3 was not a duplicate
        assert [a[:2] for a, ok in acks_of(gw) if ok][-1] == (3, 19)
        assert gw.dedup.reflashes == 1 and gw.dedup.instance("n1") == 0xB2
        # the old flash cannot come back, not even with a genuine (recorded) hello
        deliver(gw, TOP.hello("n1"), hello(9, 0, instance=0xA1, nonce=3))
        await flush(gw)
        assert gw.stats.quarantined.get("retired_instance") == 1 and gw.dedup.instance("n1") == 0xB2
        await gw.store.close()
        # restart: identity, nonce and the retired instance are restored from the checkpoint
        gw2 = await open_gw(c)
        assert gw2.dedup.instance("n1") == 0xB2 and gw2.dedup.nonce("n1") == 9 and gw2.dedup.reflashes == 1
        deliver(gw2, TOP.hello("n1"), hello(10, 0, instance=0xA1, nonce=4))
        await flush(gw2)
        assert gw2.stats.quarantined.get("retired_instance") == 1
        await gw2.store.close()
    run(go())


def test_poison_floor_allocates_nothing_big(tmp_path):
    # next_seq / floor at u32 max: the mark moves without a 2**32-bit mask (issue 10.3)
    c = cfg(tmp_path, devices={"file": devices_file(tmp_path)})

    async def go():
        gw = await open_gw(c)
        deliver(gw, TOP.data("n1"), wire.encode_readings("n1", 1, readings(0, 5, T0)))
        deliver(gw, TOP.hello("n1"), hello(1, 0xFFFFFFFF, nonce=5))
        await flush(gw)
        assert gw.dedup.hwm("n1", 1) == 0xFFFFFFFE
        assert gw.dedup.devs["n1"].boots[1][1] == 0
        await gw.store.close()
    run(go())
