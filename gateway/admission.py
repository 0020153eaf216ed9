"""Reconnect-storm admission: backlog replay credits from a token bucket.

Live records (the current boot, seq >= the next_seq announced in the device's
latest hello) flow without credits. Backlog (everything older) is replayed
only within credits, granted through acks. At most `max_replayers` devices
replay at once; the rest wait. Credits are additive grants; an ack with
replay=0 tells the device to drop its allowance and hold.

Fair and live when announced backlogs never come (issue 10.5: hellos that
announce backlog and then send nothing took every slot):
- first-byte timeout: a replayer that has sent no backlog `first_byte_s` after
  its first grant loses its slot at once and becomes a *suspect*;
- waiting devices are admitted in three tiers, FIFO within each: devices heard
  from since their hello (any data: a real device's live records flow without
  credits), then devices known only by a hello, then suspects (a suspect that
  sends anything moves to the front);
- a repeated hello keeps a device's place (active, waiting or suspect) and its
  first-byte clock: re-announcing cannot buy a slot or time.

Adaptive rate (adaptive=True; docs/gateway.md, "Acks and credits"): the bucket's
rate follows the gateway's measured capacity instead of staying at the configured
`replay_rate` (which becomes the starting value and the ceiling). Every second:

    T = committed records/s (EWMA, time constant 1 s, fed after each commit)
    O = backlog credits granted but not yet received (all devices)
    D = O / T      expected wait of a record granted now (Little's law)
    D > target                        ->  rate = max(rate / 2, beta * min(rate, T))
      (on 2 steps in a row, then at most once per target seconds; one cut at most halves)
    D < target / 4 and queue not full ->  rate = max(rate + increase * rate_max * dt,
                                                     min(rate * growth ** dt, growth * T))
    D < target / 2 and queue not full ->  rate = rate + increase * rate_max * dt
    otherwise (and before any T)      ->  rate unchanged (a full ingest queue also pauses grants)
    then, if D < target / 4 (full queue or not): rate = max(rate, T)
    then rate = clamp(rate, rate_min, rate_max); dt in s, at most 2
"""
import collections


class _Replayer:
    __slots__ = ("backlog", "granted", "received", "last_progress", "first_grant")

    def __init__(self, backlog, now):
        self.backlog = backlog
        self.granted = 0
        self.received = 0
        self.last_progress = now
        self.first_grant = None  # when credits were first granted (first-byte timeout)


class Admission:
    def __init__(self, rate, burst, max_replayers, chunk, timeout_s, now, adaptive=False, rate_min=None,
                 target_s=5.0, beta=0.8, increase=0.05, first_byte_s=3.0, growth=2.0):
        self.rate = rate / 1000.0  # tokens per ms
        # adaptive rate (records/s); see the module docstring
        self.adaptive = adaptive
        self.rate_max = float(rate)
        self.rate_min = min(float(rate_min if rate_min is not None else rate), self.rate_max)
        self.target_ms = target_s * 1000.0
        self.beta = beta
        self.increase = increase
        self.growth = growth
        self.throughput = None  # T: committed records/s (EWMA); None until measured
        self.delay_ms = 0.0  # D: expected wait of a newly granted record, ms
        self._commit_t = None  # time of the last commit observation
        self._pending = 0  # records committed in the same ms as the last observation
        self._adapt_t = now  # last controller step
        self._decrease_t = None  # last multiplicative decrease
        self.outstanding = 0  # O: credits granted, backlog not yet received (all devices)
        self._out = {}  # dev -> [credits outstanding, last grant/progress ms]
        self.decreases = 0
        self._congested = 0  # controller steps in a row that saw congestion
        self.burst = burst
        self.max_replayers = max_replayers
        self.chunk = chunk
        self.timeout_ms = timeout_s * 1000
        self.first_byte_ms = first_byte_s * 1000
        self.tokens = float(burst)
        self.last = now
        self.active = {}  # dev -> _Replayer
        # waiting tiers, each dev -> (backlog, since), FIFO: heard from, hello only, suspects
        self.waiting = collections.OrderedDict()
        self.quiet = collections.OrderedDict()
        self.suspects = collections.OrderedDict()
        self._queues = (self.waiting, self.quiet, self.suspects)
        self.credits_granted = 0
        self.backlog_announced = 0
        self.admitted = 0
        self.timeouts = 0
        self.first_byte_timeouts = 0

    def _refill(self, now):
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def _forget(self, dev):
        o = self._out.pop(dev, None)
        if o is not None:
            self.outstanding -= o[0]

    def waiting_count(self):
        return len(self.waiting) + len(self.quiet) + len(self.suspects)

    def is_waiting(self, dev):
        return dev in self.waiting or dev in self.quiet or dev in self.suspects

    def hello(self, dev, backlog, now):
        """A (re)connecting device announces its backlog; returns True if it holds a slot."""
        self._forget(dev)  # a new hello voids the credits it held
        old = self.active.pop(dev, None)
        if backlog <= 0:
            for q in self._queues:
                q.pop(dev, None)
            return False
        self.backlog_announced += backlog
        if old is not None:  # keeps its slot and its first-byte clock
            r = self.active[dev] = _Replayer(backlog, now)
            if old.received == 0:
                r.first_grant = old.first_grant
            return True
        for q in self._queues:
            if dev in q:  # keeps its place
                q[dev] = (backlog, q[dev][1])
                return False
        if len(self.active) < self.max_replayers and not self.waiting_count():
            self.active[dev] = _Replayer(backlog, now)
            self.admitted += 1
            return True
        self.quiet[dev] = (backlog, now)
        return False

    def heard(self, dev):
        """Any data from dev: a device known only by its hello (or a suspect) is real."""
        w = self.quiet.pop(dev, None)
        if w is not None:
            self.waiting[dev] = w
            return
        w = self.suspects.pop(dev, None)
        if w is not None:
            self.waiting[dev] = w
            self.waiting.move_to_end(dev, last=False)

    def backlog_received(self, dev, n, now):
        """n backlog records of dev arrived (new or duplicates: a resent record still
        spends the credit it was sent under)."""
        o = self._out.get(dev)
        if o is not None:
            k = min(n, o[0])
            o[0] -= k
            o[1] = now
            self.outstanding -= k
            if o[0] <= 0:
                del self._out[dev]
        r = self.active.get(dev)
        if r is not None:
            r.received += n
            r.last_progress = now

    def leave(self, dev):
        self._forget(dev)
        self.active.pop(dev, None)
        for q in self._queues:
            q.pop(dev, None)

    def grant(self, dev, now, paused=False):
        """(credits, replay) for the next ack to dev. Debits the bucket."""
        r = self.active.get(dev)
        if r is None:
            return 0, not self.is_waiting(dev)
        if paused:
            return 0, True
        self._refill(now)
        want = min(self.chunk - (r.granted - r.received), r.backlog - r.granted)
        c = int(min(want, self.tokens))
        if c <= 0:
            return 0, True
        self.tokens -= c
        if r.first_grant is None:
            r.first_grant = now
        r.granted += c
        self.credits_granted += c
        o = self._out.get(dev)
        if o is None:
            self._out[dev] = [c, now]
        else:
            o[0] += c
            o[1] = now
        self.outstanding += c
        if r.granted >= r.backlog:
            del self.active[dev]  # its whole backlog is granted: free the slot
        return c, True

    def tick(self, now, paused=False):
        """Release stalled replayers, admit waiting ones. Returns devices that should get a
        grant ack now (newly admitted, or replayers with nothing outstanding)."""
        out = []
        if self.adaptive:
            self.adapt(now, paused)
        for dev, r in list(self.active.items()):
            if r.received == 0 and r.first_grant is not None and \
                    now - r.first_grant >= min(self.first_byte_ms, self.timeout_ms):
                # granted, and not one record back: free the slot now, admit it again last
                del self.active[dev]
                self._forget(dev)
                self.first_byte_timeouts += 1
                self.suspects[dev] = (r.backlog, now)
            elif now - r.last_progress >= self.timeout_ms and r.granted > r.received:
                # stalled: free the slot, but queue the rest of its backlog again (as a
                # suspect, until it sends again) so the device is never left holding
                # records with no credits
                del self.active[dev]
                self.timeouts += 1
                self.suspects[dev] = (max(1, r.backlog - r.received), now)
            elif r.granted <= r.received:
                out.append(dev)
        for q in self._queues:
            while q and len(self.active) < self.max_replayers:
                dev, (backlog, _since) = q.popitem(last=False)
                self.active[dev] = _Replayer(backlog, now)
                self.admitted += 1
                out.append(dev)
        return [] if paused else out

    def tick_all(self, now, send, paused=False, rounds=16):
        """tick(), and send(dev) a grant to each device it returns; again while devices were
        admitted, tokens remain and devices wait. A replayer whose whole backlog is granted
        frees its slot at once, so one tick() admits at most max_replayers devices: the token
        bucket, not the timer's tick rate, must bound admission (bench_storm: 32 x 720
        credits per tick at 3-5 ticks/s under load held the drain near 80k/s, tokens unused)."""
        for _ in range(rounds):
            devs = self.tick(now, paused)
            for dev in devs:
                send(dev)
            if not devs or self.tokens < 1 or not self.waiting_count():
                return

    # ---------------------------------------------------------------- adaptive rate

    def committed(self, records, now):
        """A commit made records durable; feeds T (EWMA of committed records/s, tau 1 s)."""
        if self._commit_t is None:
            self._commit_t = now
            return
        dt = now - self._commit_t
        if dt <= 0:
            self._pending += records
            return
        records += self._pending
        self._pending = 0
        self._commit_t = now
        sample = records * 1000.0 / dt
        if self.throughput is None:
            self.throughput = sample
        else:
            w = min(1.0, dt / 1000.0)
            self.throughput += w * (sample - self.throughput)

    def adapt(self, now, queue_full=False):
        """One controller step (at most one per second); returns the rate in records/s."""
        dt = now - self._adapt_t
        if dt < 1000:
            return self.rate * 1000.0
        self._adapt_t = now
        # a device that took credits and went silent (no will) stops counting after the timeout
        for dev in [d for d, o in self._out.items() if now - o[1] >= self.timeout_ms]:
            self._forget(dev)
        T = self.throughput
        if T is None:
            return self.rate * 1000.0  # no measurement yet: keep the starting rate
        self._refill(now)  # tokens up to now at the old rate
        rate = self.rate * 1000.0
        O = self.outstanding
        self.delay_ms = D = O * 1000.0 / T if T > 0 else (float("inf") if O else 0.0)
        if D > self.target_ms:
            # congested: act only when it is seen on two steps in a row (T lags a step up
            # in load by about its time constant), then at most once per target
            self._congested += 1
            if self._congested >= 2 and (self._decrease_t is None or now - self._decrease_t >= self.target_ms):
                self._decrease_t = now
                self.decreases += 1
                # T measured during a connect/hello burst can be a fraction of the capacity:
                # one cut at most halves the rate, so it never falls far below what drains
                rate = max(rate / 2.0, self.beta * min(rate, T))
        else:
            self._congested = 0
            if D < self.target_ms / 2 and not queue_full:  # a full queue holds the rate (and pauses grants)
                s = min(dt, 2000) / 1000.0
                up = rate + self.increase * self.rate_max * s
                if D < self.target_ms / 4:  # far under the target: climb back multiplicatively,
                    # but not past growth x T (a Pi committing 20k/s must not jump to a 200k ceiling)
                    up = max(up, min(rate * self.growth ** s, self.growth * T))
                rate = up
            if D < self.target_ms / 4:
                # little granted and not received: granting less than the gateway commits would
                # starve it within about target / 4, however full the queue is now (bench_storm:
                # a rate cut to 54k/s held by a full queue while T was back at 110k/s emptied
                # the queue 2 s later, every 15-20 s)
                rate = max(rate, T)
        rate = max(self.rate_min, min(self.rate_max, rate))
        self.rate = rate / 1000.0
        return rate
