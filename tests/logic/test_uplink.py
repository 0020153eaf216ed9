# Uplink logic without a network: ack/credit handling, message grouping, send-time stamping.
# Coroutines are driven by hand (the fake client never really waits), so this also runs under
# the MicroPython test build, which has no asyncio.run.
import struct

from shared import auth, wire
from firmware import config
from firmware.outbox import Outbox
from firmware.obframe import encode_frame
from firmware.clock import Clock
from firmware.uplink import Uplink
from firmware.hal_sim import SimHal
from firmware.hal import ticks_add as T
from tests.logic.util import reading

EPOCH = 1767225600000
KEY = "5a" * 32


def _run(coro):
    try:
        while True:
            coro.send(None)
    except StopIteration as e:
        return e.value


class FakeClient:
    def __init__(self):
        self.pubs = []
        self.connected = True
        self.inflight = []

    async def publish(self, topic, payload, qos=0, retain=False):
        self.pubs.append((topic, payload, qos, retain))
        return len(self.pubs)


def _setup(batch_max=50):
    hal = SimHal(seed=1, console=False)
    cfg = config.load({"device_id": "d1", "broker": {"host": "h", "user": "d1", "password": "pw-0123456789",
                       "tls": {"ca": "/ca.pem", "server_hostname": "broker"}}, "uplink": {"batch_max": batch_max},
                       "ack_key": KEY})
    ob = Outbox(hal.fs, 2, batch_records=4).load()
    ck = Clock(hal, 2)
    up = Uplink(cfg, hal, ob, ck, "t")
    up.client = FakeClient()
    return hal, ob, ck, up


def test_credits_are_additive_and_replay_zero_holds():
    hal, ob, ck, up = _setup()
    up.handle_ack((2, 0, None, 5, True, wire.ACK_NONE, 1))
    up.handle_ack((2, 0, None, 7, True, wire.ACK_NONE, 1))
    assert up.credits == 12 and up.replay
    up.handle_ack((2, 0, None, 9, False, wire.ACK_NONE, 1))
    assert up.credits == 0 and not up.replay


def test_ack_trims_and_beacon_sets_clock():
    hal, ob, ck, up = _setup()
    for i in range(8):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)
    ob.flush()
    assert ob.unacked() == 8
    up.handle_ack((2, 7, EPOCH, 0, True, wire.ACK_HAS_TIME, 1))
    assert ob.unacked() == 0 and ob.floor() == (2, 8)  # the segment being appended to stays until full
    assert ck.synced and ck.source == "gw"


def test_send_groups_by_boot_and_type_and_stamps_current_boot():
    hal, ob, ck, up = _setup(batch_max=3)
    ck.boot_epoch = EPOCH
    recs = [(1, 5, 100, wire.KIND_READING, wire.FLAG_UNSYNCED, (0, 1)),  # earlier boot: stays unsynced
            (1, 6, 200, wire.KIND_READING, wire.FLAG_UNSYNCED, (0, 2)),
            (2, 0, 300, wire.KIND_READING, wire.FLAG_UNSYNCED, (1, 3)),  # this boot: converted
            (2, 1, EPOCH + 400, wire.KIND_READING, 0, (1, 4)),
            (2, 2, EPOCH + 500, wire.KIND_CEP, 0, ("hot", 2, 100, (1,))),
            (2, 3, EPOCH + 600, wire.KIND_READING, 0, (1, 5)),
            (2, 4, EPOCH + 700, wire.KIND_READING, 0, (1, 6)),
            (2, 5, EPOCH + 800, wire.KIND_READING, 0, (1, 7)),
            (2, 6, EPOCH + 900, wire.KIND_READING, 0, (1, 8))]
    fr = b"".join(encode_frame(r[0], r[1], r[2], r[3], r[4], wire.encode_body(r[3], r[5]) if r[3] != wire.KIND_READING
                               else struct.pack(">Bi", r[5][0], r[5][1])) for r in recs)
    assert _run(up.send(fr)) == 9
    msgs = [wire.decode_data(p[1]) for p in up.client.pubs]
    assert all(p[0] == "edgeflow/d/d1/data" and p[2] == 1 for p in up.client.pubs)
    shape = [(m[0], m[2], [r[0] if m[0] == wire.MSG_READINGS else r[1] for r in m[3]]) for m in msgs]
    assert shape == [(wire.MSG_READINGS, 1, [5, 6]), (wire.MSG_READINGS, 2, [0, 1]),
                     (wire.MSG_RECORDS, 2, [2]), (wire.MSG_READINGS, 2, [3, 4, 5]),
                     (wire.MSG_READINGS, 2, [6])]
    assert msgs[0][3][0] == (5, 100, 0, wire.FLAG_UNSYNCED, 1)
    assert msgs[1][3][0] == (0, EPOCH + 300, 1, 0, 3)
    assert msgs[2][3][0] == (wire.KIND_CEP, 2, EPOCH + 500, 0, ("hot", 2, 100, (1,)))
    assert up.c["sent"] == 9 and up.c["msgs"] == 5
    assert up._sent_max == {1: 6, 2: 6} and not ob.acked  # outstanding: resent without acks


def test_hello_reports_backlog_and_live_boundary():
    hal, ob, ck, up = _setup()
    for i in range(6):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)
    ob.begin_session()
    _run(up.hello())
    t, p, q, r = up.client.pubs[0]
    h = wire.decode_hello(p)
    assert t == "edgeflow/d/d1/hello" and q == 1
    assert (h["boot"], h["next_seq"], h["backlog"], h["floor_boot"], h["floor_seq"], h["fw"]) == (2, 6, 6, 2, 0, "t")
    assert wire.hello_mac_ok(p, bytes.fromhex(KEY)) and h["nonce"] == up.nonce and h["instance"] == up.instance


def test_liveness_hello_when_backlog_stalls_without_credits():
    hal, ob, ck, up = _setup()
    for i in range(6):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)
    ob.begin_session()
    assert ob.has_backlog()
    r = up.resend_ms
    up.gw_online = True
    up.handle_ack((2, 0, None, 0, True, wire.ACK_NONE, 1))  # replay allowed, no credits
    t0 = up._ack_at
    up._hello_at = t0
    hellos = lambda: [p for p in up.client.pubs if p[0] == "edgeflow/d/d1/hello"]
    assert not _run(up.check_stall(T(t0, r - 1))) and not hellos()  # not yet resend_ms
    assert _run(up.check_stall(T(t0, r)))
    assert len(hellos()) == 1 and up.c["stalls"] == 1
    h = wire.decode_hello(hellos()[0][1])
    assert (h["backlog"], h["floor_seq"]) == (6, 0)
    # bounded: at most once per resend_ms, counted from that hello
    up._hello_at = T(t0, r)
    assert not _run(up.check_stall(T(t0, 2 * r - 1)))
    assert _run(up.check_stall(T(t0, 2 * r))) and len(hellos()) == 2
    up._hello_at = T(t0, 2 * r)
    # no guard while credits remain, replay is held, or nothing is held; the (unsigned)
    # gateway state is only a hint: "offline" does not stop the guard
    now = T(t0, 10 * r)
    up.credits = 1
    assert not up.stalled(now)
    up.credits = 0
    up.replay = False
    assert not up.stalled(now)
    up.replay = True
    up.gw_online = False
    assert up.stalled(now)
    # an ack restarts the wait
    up.handle_ack((2, 0, None, 0, True, wire.ACK_NONE, 1))
    assert not up.stalled(T(up._ack_at, r - 1))
    ob.rewind()
    while ob.has_backlog():
        ob.read_backlog(50)
    assert not up.stalled(T(up._ack_at, 10 * r))
    assert len(hellos()) == 2


def _ack(up, boot, seq, t, credits, nonce, key=KEY, replay=True):
    k = auth.Hmac(bytes.fromhex(key)) if key else None
    p = wire.encode_ack("d1", boot, seq, t, credits, nonce, k, replay)
    up._on_message(up.t_ack, p, False)
    while up._acks:
        up.handle_ack(up._acks.pop(0))


def test_hello_floor_counts_the_ram_batch():
    # issue 10.1: flash all acked, records still in the RAM batch -> the floor is the first of
    # them, never next_seq (the gateway would skip them, ack them as duplicates, and they're lost)
    hal, ob, ck, up = _setup()
    for i in range(4):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)  # batch_records=4: flushed
    assert ob.pending() == 0 and ob.on_ack(2, 3)
    for i in range(3):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)  # seqs 4..6 in RAM only
    assert ob.pending() == 3 and ob.seq == 7
    _run(up.hello())
    h = wire.decode_hello(up.client.pubs[-1][1])
    assert (h["floor_boot"], h["floor_seq"], h["next_seq"]) == (2, 4, 7)
    ob.flush()
    assert ob.floor() == (2, 4)
    ob.on_ack(2, 6)
    assert ob.floor() == (2, 7)


def test_forged_and_replayed_acks_are_ignored():
    hal, ob, ck, up = _setup()
    for i in range(8):
        reading(ob, 0, i, wire.FLAG_UNSYNCED, i)
    ob.flush()
    _run(up.hello())
    n1 = up.nonce
    _ack(up, 2, 7, EPOCH, 5, n1, key="66" * 32)  # wrong key: forged
    _ack(up, 2, 7, EPOCH, 5, n1 ^ 1)  # right key, another session's nonce
    _ack(up, 2, 7, EPOCH, 5, n1, key=None)  # no MAC at all
    assert up.c["bad_acks"] == 3 and up.c["acks"] == 0 and ob.unacked() == 8 and up.credits == 0
    _ack(up, 2, 3, EPOCH + 1000, 5, n1)  # genuine
    assert up.c["acks"] == 1 and ob.unacked() == 4 and up.credits == 5 and ck.synced
    _run(up.hello())  # new nonce; acks already in flight under the previous one still count
    _ack(up, 2, 5, EPOCH + 2000, 0, n1)
    assert up.c["acks"] == 2 and ob.unacked() == 2
    _run(up.hello())  # two hellos later the first nonce is dead
    _ack(up, 2, 7, EPOCH + 3000, 0, n1)
    assert up.c["bad_acks"] == 4 and ob.unacked() == 2
    # a genuine but older time beacon (replayed within the session) does not step the clock back
    _ack(up, 2, 7, EPOCH + 500, 0, up.nonce)
    assert up.c["old_beacon"] == 1 and ob.unacked() == 0


def test_next_host_round_robin_over_broker_hosts():
    hal = SimHal(seed=1, console=False)
    cfg = config.load({"device_id": "d1", "broker": {"host": "n1", "port": 1883, "hosts": ["n2:1884", "n3"]},
                       "ack_key": KEY, "insecure": True})
    up = Uplink(cfg, hal, Outbox(hal.fs, 2, batch_records=4).load(), Clock(hal, 2), "t")
    seen = [(up.client.host, up.client.port)]
    for _ in range(3):
        up.next_host()
        seen.append((up.client.host, up.client.port))
    assert seen == [("n1", 1883), ("n2", 1884), ("n3", 1883), ("n1", 1883)]
