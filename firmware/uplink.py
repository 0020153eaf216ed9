# The uplink: Wi-Fi -> MQTT session -> hello, live send, backlog replay within credits,
# ack handling (outbox trim), time beacon (clock). Protocol: docs/firmware.md "Uplink".
#
# - Hello (docs/wire.md "The hello contract"): floor = oldest record held anywhere (flash or
#   RAM batch), instance id, and a fresh random nonce; signed with ack_key.
# - Acks are authenticated: the MAC (ack_key over device id + every field) and the nonce of the
#   latest hello (or the one before, for acks already in flight) must match, else the ack is
#   counted in bad_acks and ignored. Time beacons older than the last accepted are ignored.
# - The retained gateway state is only a hint (it is not signed): it triggers a hello; replay
#   follows the signed acks' replay flag and credits alone.
# - Live records (flushed to flash during this session, seq >= the hello's next_seq) are sent
#   as they come.
# - Backlog (stored but not sent in this session: outages, earlier boots) is replayed oldest
#   first, only while the latest ack's replay flag is set, and within the credits granted by acks (additive grants; an ack with replay 0
#   drops the allowance).
# - Acks: every record of (boot, seq <= acked) is committed -> outbox.on_ack trims flash.
# - Resend: unacked records are replayed again after a reconnect, or when acks make no
#   progress for resend_ms while records are outstanding (gateway dedup absorbs duplicates).
# - Liveness: backlog held, replay allowed (replay flag set) but no credits
#   and no ack for resend_ms -> a fresh hello (at most once per resend_ms), so a gateway that
#   lost track of the device re-admits it and grants again.
# - Reconnect: exponential backoff with full jitter; Wi-Fi and broker outages are separate
#   states. Nothing here blocks sampling: every wait is an asyncio sleep.
import asyncio
import struct

from shared import wire_dev as wire  # the device side of the contract
from firmware.hal import ticks_ms, ticks_diff, sleep_ms, unload
from firmware.slots import rand32

try:
    from micropython import const
except ImportError:  # CPython
    from firmware.cpyticks import const

_MAX_CREDITS = const(1 << 24)
_GW_HELLO_MS = const(1000)  # hellos triggered by the (unsigned) gateway state: at most one per second


class Uplink:
    def __init__(self, cfg, hal, outbox, clock, fw, instance=1):
        from firmware.appboot import uplink_init  # set-up code: unloaded after boot (RAM)
        uplink_init(self, cfg, hal, outbox, clock, fw, instance)

    # ------------------------------------------------------------ incoming

    def _on_message(self, topic, payload, retain):
        try:
            if topic == self.t_ack:
                a = wire.decode_ack(payload)
                # forged (bad MAC) or replayed (nonce of an older hello) acks are refused
                n = a[6]
                if (n == 0 or (n != self.nonce and n != self.prev_nonce)
                        or (self.key is not None and not wire.ack_mac_ok(payload, self.devb, self.key))):
                    self.c["bad_acks"] += 1
                    return
                if len(self._acks) >= 32:
                    self._acks.pop(0)  # acks are cumulative: the newest ones matter
                self._acks.append(a)
            elif topic == self.t_gw:
                on = wire.decode_state(payload, True)
                if on != self.gw_online:
                    self.gw_online = on
                    self._gw_changed = True
            self.wake.set()
        except wire.WireError:
            self.c["bad_msgs"] += 1

    def handle_ack(self, a):
        boot, seq, gw_time, credits, replay, flags, _nonce = a
        self.c["acks"] += 1
        self._ack_at = ticks_ms()
        if not flags & wire.ACK_NONE:
            if self.outbox.on_ack(boot, seq):
                self._progress = ticks_ms()
        # credits are additive grants; replay 0 drops the allowance and holds replay
        if replay:
            c = self.credits + credits
            self.credits = c if c < _MAX_CREDITS else _MAX_CREDITS
        else:
            self.credits = 0
        self.replay = replay
        if gw_time is not None:
            if self._beacon is not None and gw_time < self._beacon:
                self.c["old_beacon"] += 1  # an older (replayed) ack must not step the clock back
            else:
                self._beacon = gw_time
                self.c["beacons"] += 1
                self.clock.set_time(gw_time, "gw")
        self.backoff.reset()

    def next_host(self):
        """After a failed connect or a lost session: the next broker of broker.hosts."""
        if len(self.hosts) > 1:
            self._hi = (self._hi + 1) % len(self.hosts)
            self.client.host, self.client.port = self.hosts[self._hi]

    # ------------------------------------------------------------ outgoing

    async def hello(self):
        ob = self.outbox
        b, s = ob.floor()
        now = self.clock.now() or 0
        n = rand32() & 0x3FFFFFFF  # 30 bits: a small int on the ESP32, no long-int maths per ack
        while n == 0 or n == self.nonce:
            n = rand32() & 0x3FFFFFFF
        self.prev_nonce = self.nonce
        self.nonce = n
        from shared import wire_ctl  # connect time (shared/wire_ctl.py): unloaded after (RAM)
        p = wire_ctl.encode_hello(self.dev, ob.boot, ob.seq, now, ob.unacked(), b, s, self.instance, n, self.fw,
                                  self.key)
        wire_ctl = None
        unload("shared.wire_ctl")
        self._hello_at = ticks_ms()
        await self.client.publish(self.t_hello, p, 1)
        self.c["hellos"] += 1

    def stalled(self, now):
        """Backlog held, replay allowed, no credits, and neither an ack nor a hello for
        resend_ms: the gateway may have lost track of this device."""
        return (self.credits <= 0 and self.replay and self.outbox.has_backlog()
                and ticks_diff(now, self._ack_at) >= self.resend_ms
                and ticks_diff(now, self._hello_at) >= self.resend_ms)

    async def check_stall(self, now=None):
        """Liveness guard: a fresh hello when stalled() (bounded by resend_ms, since the
        hello itself restarts the wait). Returns True if a hello was sent."""
        if not self.stalled(ticks_ms() if now is None else now):
            return False
        self.c["stalls"] += 1
        await self.hello()
        return True

    async def send(self, fr):
        """Publish stored frames (firmware/outbox.py: read_backlog / take_live, oldest first)
        as few data messages as allowed, encoded straight from the frames (no record tuples:
        device RAM). Returns the number of records."""
        i = 0
        n = len(fr)
        k = 0
        while i < n:
            j, m, last, st = self._span(fr, i, n)
            boot = _u32(fr, i + 3)
            try:
                payload = self._message(fr, i, j, m, st)
            except wire.WireError:
                self.c["enc_errors"] += 1
                payload = None
            k += m
            i = j
            if payload is None:
                continue
            await self.client.publish(self.t_data, payload, 1)
            payload = None
            if last > self._sent_max.get(boot, -1):
                self._sent_max[boot] = last
            self.c["msgs"] += 1
            self.c["sent"] += m
        return k

    def _dt(self, fr, j, i, st):
        """Sent time of the frame at fr[j:] minus that of the frame at fr[i:] (same boot; st:
        its records are stamped, see _span); 16-bit limbs: small ints unless the span is large."""
        d = 0
        for x in range(11, 19, 2):
            d = (d << 16) + ((fr[j + x] << 8) | fr[j + x + 1]) - ((fr[i + x] << 8) | fr[i + x + 1])
        if st and (fr[j + 20] ^ fr[i + 20]) & wire.FLAG_UNSYNCED:
            e = self.clock.boot_epoch  # one stamped, one not (the clock was set in between)
            d += e if fr[j + 20] & wire.FLAG_UNSYNCED else -e
        return d

    def _span(self, fr, i, n):
        """(end, count, last seq, stamped) of the frames from fr[i:] that go into one message:
        the same boot, all readings or none, seqs within 65535 and sent times within the int32
        span of the first, at most batch_max. stamped: records of this boot get the clock's
        epoch (firmware.clock.stamp)."""
        boot = _u32(fr, i + 3)
        q0 = _u32(fr, i + 7)
        rd = fr[i + 19] == wire.KIND_READING
        ck = self.clock
        st = boot == ck.boot and ck.boot_epoch is not None
        j = i
        m = 0
        last = q0
        while j < n and m < self.batch_max:
            q = _u32(fr, j + 7)
            if _u32(fr, j + 3) != boot or (fr[j + 19] == wire.KIND_READING) != rd or q - q0 > 0xFFFF:
                break
            d = self._dt(fr, j, i, st)
            if d > wire.I32_MAX or -d > wire.I32_MAX:
                break
            last = q
            m += 1
            j += 7 + ((fr[j + 1] << 8) | fr[j + 2])
        return j, m, last, st

    def _message(self, fr, i, j, n, st):
        """The frames fr[i:j] (n of them, from _span: one boot, all readings or none) as one
        data message, times stamped for sending, encoded straight from the frames (no record
        tuples: device RAM). A frame: magic, len u16, boot, seq, t i64, kind, flags (offset 20),
        body, crc. Readings: records of shared/wire_dev.py's _READING layout; other kinds: the
        record header, then the body as stored (the outbox keeps wire_dev.encode_body's bytes)."""
        boot = _u32(fr, i + 3)
        q0 = _u32(fr, i + 7)
        t, _ = self.clock.stamp(boot, struct.unpack_from(">q", fr, i + 11)[0], fr[i + 20])
        rd = fr[i + 19] == wire.KIND_READING
        # a reading is READING_SIZE bytes; around any other body, a frame's 25 bytes become a
        # REC_SIZE record header
        out, off = wire.records_buffer(self.dev, boot, q0, t, n, n * wire.READING_SIZE if rd
                                       else (j - i) - n * (25 - wire.REC_SIZE), rd)
        mv = memoryview(fr)
        o = i
        while o < j:
            e = o + 3 + ((fr[o + 1] << 8) | fr[o + 2])  # end of the payload
            fl = fr[o + 20] & ~wire.FLAG_UNSYNCED if st else fr[o + 20]
            if rd:  # seq and time offsets, channel, flags, then the value i32 as stored
                struct.pack_into(">HiBB", out, off, _u32(fr, o + 7) - q0, self._dt(fr, o, i, st), fr[o + 21], fl)
                for x in range(22, 26):
                    out[off + x - 14] = fr[o + x]
                off += wire.READING_SIZE
            else:
                wire.put_record(out, off, fr[o + 19], _u32(fr, o + 7), t + self._dt(fr, o, i, st), fl, q0, t)
                off += wire.REC_SIZE
                out[off:off + e - o - 21] = mv[o + 21:e]
                off += e - o - 21
            o = e + 4
        return out

    # ------------------------------------------------------------ session

    async def _sleep(self, ms):
        """Real-time sleep in slices, ends early on stop()."""
        while ms > 0 and self.running:
            d = ms if ms < 200 else 200
            await sleep_ms(d)
            ms -= d

    async def run(self):
        wifi_started = None
        while self.running:
            if not self.hal.wifi_connected():
                now = ticks_ms()
                if wifi_started is None or ticks_diff(now, wifi_started) > self.wifi_timeout_ms:
                    self.c["wifi_lost"] += 1
                    wifi_started = now
                    try:
                        self.hal.wifi_connect(self.cfg["wifi"]["ssid"], self.cfg["wifi"]["password"])
                    except Exception as e:
                        self.hal.console("wifi error %r" % (e,))
                await self._sleep(250)
                continue
            wifi_started = None
            up = False  # connected: the session ran
            try:
                del self.client.inflight[:]  # the outbox replays what was not acked
                await self.client.connect()
                up = True
                self.c["connects"] += 1
                await self._session()
            except Exception as e:
                if self.running:
                    self.hal.console(("mqtt session ended (%r)" if up else "mqtt connect failed (%r)") % (e,))
            if up:
                self.session = False
                self.outbox.end_session()
                self.client.close()
            if self.running:
                self.c["reconnects" if up else "conn_fails"] += 1
                self.next_host()
                await self._sleep(self.backoff.next())

    async def _session(self):
        cl = self.client
        ob = self.outbox
        c = self.c
        self.gw_online = False
        self._gw_changed = False
        self.credits = 0
        self.replay = False
        self._acks = []
        self._sent_max = {}
        await cl.subscribe(self.t_ack, 1)
        await cl.subscribe(self.t_gw, 1)
        await cl.publish(self.t_state, wire.encode_state(True), 1, True)
        # the broker sends the retained gateway state right after the SUBACK: take it before
        # the hello so one hello per connect suffices (a later offline->online sends another)
        t0 = ticks_ms()
        while not self._gw_changed and cl.connected and ticks_diff(ticks_ms(), t0) < 300:
            await sleep_ms(10)
        self._gw_changed = False
        ob.begin_session()
        self.session = True
        await self.hello()
        self._progress = self._ack_at = ticks_ms()
        while self.running and cl.connected:
            if not self.hal.wifi_connected():
                cl.close()
                break
            while self._acks:
                self.handle_ack(self._acks.pop(0))
            if self._gw_changed and ticks_diff(ticks_ms(), self._hello_at) >= _GW_HELLO_MS:
                self._gw_changed = False
                if self.gw_online:
                    await self.hello()
            if ob.need_rewind:
                await self._rewind()
            fr = ob.take_live()
            if fr:
                c["live"] += await self.send(fr)
            fr = None  # RAM: the sent records go before the next take_live / read_backlog
            n = self.credits
            if self.replay and n > 0 and ob.has_backlog():
                fr = ob.read_backlog(n if n < self.batch_max else self.batch_max)
                if fr:
                    n = await self.send(fr)
                    fr = None
                    self.credits -= n
                    c["replayed"] += n
                    continue
                fr = None
            await self.check_stall()
            sm = self._sent_max
            for b in sm:
                if sm[b] > ob.acked.get(b, -1):  # records sent and not acked: resend them
                    if ticks_diff(ticks_ms(), self._progress) > self.resend_ms:  # after no progress
                        await self._rewind()
                        self._progress = ticks_ms()
                    break
            else:
                self._progress = ticks_ms()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def _rewind(self):
        """Everything unacked becomes backlog again; a fresh hello tells the gateway the new
        backlog and live boundary (it grants credits for backlog only)."""
        self.outbox.rewind()
        self.c["rewinds"] += 1
        await self.hello()

    async def shutdown(self):
        """Graceful: announce offline (retained) and disconnect (no will)."""
        self.running = False
        if self.client.connected:
            try:
                await self.client.publish(self.t_state, wire.encode_state(False), 1, True)
                await self.client.wait_inflight(1000)
            except Exception:
                pass
            await self.client.disconnect()

    def kill(self):
        self.running = False
        self.client.close()
        self.wake.set()


def _u32(b, o):
    """The big-endian u32 at b[o:] (a small int for boots < 2**29 and seqs < 2**30)."""
    return (b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]
