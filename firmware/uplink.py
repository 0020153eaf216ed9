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

from shared import wire_dev as wire  # the device side of the contract
from firmware.hal import ticks_ms, ticks_diff, sleep_ms, unload
from firmware.slots import rand32


_MAX_CREDITS = 1 << 24
_GW_HELLO_MS = 1000  # hellos triggered by the (unsigned) gateway state: at most one per second


class Uplink:
    def __init__(self, cfg, hal, outbox, clock, fw, console=None, instance=1):
        from firmware.appboot import uplink_init  # set-up code: unloaded after boot (RAM)
        uplink_init(self, cfg, hal, outbox, clock, fw, console, instance)

    # ------------------------------------------------------------ incoming

    def _on_message(self, topic, payload, retain):
        try:
            if topic == self.t_ack:
                a = wire.decode_ack(payload)
                if not self.ack_ok(payload, a[6]):
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

    def ack_ok(self, payload, nonce):
        """Forged (bad MAC) or replayed (nonce of an older hello) acks are refused."""
        if nonce == 0 or (nonce != self.nonce and nonce != self.prev_nonce):
            return False
        return self.key is None or wire.ack_mac_ok(payload, self.devb, self.key)

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
                self.c["old_beacons"] += 1  # an older (replayed) ack must not step the clock back
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

    def outstanding(self):
        for b in self._sent_max:
            if self._sent_max[b] > self.outbox.acked.get(b, -1):
                return True
        return False

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
        self.c["stall_hellos"] += 1
        await self.hello()
        return True

    async def send(self, recs):
        """Publish records (boot, seq, t, kind, flags, body) as few data messages as allowed."""
        i = 0
        n = len(recs)
        bm = self.batch_max
        while i < n:
            r = recs[i]
            boot = r[0]
            base_seq = r[1]
            j = i + 1
            try:
                if r[3] == wire.KIND_READING:
                    j = self._span(recs, i, n, bm)
                    payload = self._readings(recs, i, j)
                else:
                    row = self._row(r)
                    t = row[2]
                    group = [row]
                    j = i + 1
                    while j < n and len(group) < bm:
                        r2 = recs[j]
                        if r2[0] != boot or r2[3] == wire.KIND_READING or r2[1] - base_seq > 0xFFFF:
                            break
                        row = self._row(r2)
                        t2 = row[2]
                        if t2 - t > wire.I32_MAX or t - t2 > wire.I32_MAX:
                            break
                        group.append(row)
                        j += 1
                    payload = wire.encode_records(self.dev, boot, group)
                    group = row = None  # RAM: only the payload lives while it is published
            except wire.WireError:
                self.c["encode_errors"] += 1
                i = j
                continue
            await self.client.publish(self.t_data, payload, 1)
            payload = None
            last = recs[j - 1][1]
            if last > self._sent_max.get(boot, -1):
                self._sent_max[boot] = last
            self.c["msgs"] += 1
            self.c["sent"] += j - i
            i = j

    def _span(self, recs, i, n, bm):
        """End of the readings that go into one message with recs[i] (same boot, seqs within
        65535, stamped times within the int32 span, at most bm)."""
        r = recs[i]
        boot = r[0]
        base_seq = r[1]
        t = self._t(r)
        j = i + 1
        while j < n and j - i < bm:
            r2 = recs[j]
            if r2[0] != boot or r2[3] != wire.KIND_READING or r2[1] - base_seq > 0xFFFF:
                break
            d = self._t(r2) - t
            if d > wire.I32_MAX or -d > wire.I32_MAX:
                break
            j += 1
        return j

    def _readings(self, recs, i, j):
        """The readings recs[i:j] as one message, encoded straight from the stored records (no
        row tuples: device RAM), times stamped for sending."""
        r = recs[i]
        base_seq = r[1]
        t = self._t(r)
        out, off = wire.readings_buffer(self.dev, r[0], base_seq, t, j - i)
        ck = self.clock
        for k in range(i, j):
            r2 = recs[k]
            b = r2[5]
            fl = r2[4]
            if fl & wire.FLAG_UNSYNCED and r2[0] == ck.boot and ck.boot_epoch is not None:
                wire.put_reading(out, off, r2[1], ck.boot_epoch + r2[2], b[0], fl & ~wire.FLAG_UNSYNCED, b[1], base_seq, t)
            else:
                wire.put_reading(out, off, r2[1], r2[2], b[0], fl, b[1], base_seq, t)
            off += wire.READING_SIZE
        return out

    def _t(self, r):
        """A stored record's time as it goes on the wire (firmware.clock.stamp, no tuple)."""
        ck = self.clock
        if r[4] & wire.FLAG_UNSYNCED and r[0] == ck.boot and ck.boot_epoch is not None:
            return ck.boot_epoch + r[2]
        return r[2]

    def _row(self, r):
        """The wire row of a stored (non-reading) record, its time stamped for sending."""
        t, fl = self.clock.stamp(r[0], r[2], r[4])
        return (r[3], r[1], t, fl, r[5])

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
                if wifi_started is None or ticks_diff(now, wifi_started) > self.cfg["uplink"]["wifi_timeout_ms"]:
                    self.c["wifi_outages"] += 1
                    wifi_started = now
                    try:
                        self.hal.wifi_connect(self.cfg["wifi"]["ssid"], self.cfg["wifi"]["password"])
                    except Exception as e:
                        self.console("wifi error %r" % (e,))
                await self._sleep(250)
                continue
            wifi_started = None
            try:
                del self.client.inflight[:]  # the outbox replays what was not acked
                await self.client.connect()
                self.c["connects"] += 1
            except Exception as e:
                self.c["connect_failures"] += 1
                self.next_host()
                d = self.backoff.next()
                self.console("mqtt connect failed (%s), retry in %d ms" % (_err(e), d))
                await self._sleep(d)
                continue
            try:
                await self._session()
            except Exception as e:
                if self.running:
                    self.console("mqtt session ended (%s)" % _err(e))
            self.session = False
            self.outbox.end_session()
            self.client.close()
            if self.running:
                self.c["reconnects"] += 1
                self.next_host()
                await self._sleep(self.backoff.next())

    async def _session(self):
        cl = self.client
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
        self.outbox.begin_session()
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
            if self.outbox.need_rewind:
                await self._rewind()
            live = self.outbox.take_live()
            if live:
                await self.send(live)
                self.c["live"] += len(live)
            live = None  # RAM: the sent records go before the next take_live / read_backlog
            if self.replay and self.credits > 0 and self.outbox.has_backlog():
                n = self.credits if self.credits < self.batch_max else self.batch_max
                recs = self.outbox.read_backlog(n)
                if recs:
                    self.credits -= len(recs)
                    await self.send(recs)
                    self.c["replayed"] += len(recs)
                    recs = None
                    continue
                recs = None
            await self.check_stall()
            if self.outstanding():
                if ticks_diff(ticks_ms(), self._progress) > self.resend_ms:
                    await self._rewind()
                    self._progress = ticks_ms()
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


def _err(e):
    s = str(e)
    return "%s %s" % (type(e).__name__, s) if s else type(e).__name__
