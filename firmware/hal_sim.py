# Simulated HAL: no hardware, runs under CPython and MicroPython.
#
# - MemFS: in-memory filesystem (survives App restarts as long as the SimHal object lives)
# - FailingFS: wraps a filesystem and cuts the power after a byte budget (torn writes)
# - Signal: deterministic, seeded, integer-only generators with faults (stuck, spikes, missing)
# - SimHal: virtual clock (speed factor, jumps), Wi-Fi up/down, NTP on/off, reboot, power cut
import asyncio
import time

from firmware import hal as _hal
from firmware.hal_base import Hal


class PowerCut(Exception):
    """Raised by FailingFS when the simulated power goes away (not an OSError: nothing catches it)."""


# ---------------------------------------------------------------- filesystems


class _MemFile:
    def __init__(self, fs, path, mode):
        self.fs = fs
        self.path = path
        self.mode = mode
        self.pos = 0
        if "w" in mode:
            fs.files[path] = bytearray()
        elif path not in fs.files:
            if "a" in mode:
                fs.files[path] = bytearray()
            else:
                raise OSError(2, "ENOENT")
        if "a" in mode:
            self.pos = len(fs.files[path])

    def read(self, n=-1):
        data = self.fs.files.get(self.path, b"")
        if n is None or n < 0:
            n = len(data) - self.pos
        out = bytes(data[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def readinto(self, b):
        data = self.fs.files.get(self.path, b"")
        n = len(data) - self.pos
        if n > len(b):
            n = len(b)
        if n <= 0:
            return 0
        b[0:n] = data[self.pos:self.pos + n]
        self.pos += n
        return n

    def write(self, b):
        buf = self.fs.files[self.path]
        if "a" in self.mode:
            self.pos = len(buf)
        end = self.pos + len(b)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[self.pos:end] = b
        self.pos = end
        return len(b)

    def seek(self, off, whence=0):
        if whence == 0:
            self.pos = off
        elif whence == 1:
            self.pos += off
        else:
            self.pos = len(self.fs.files.get(self.path, b"")) + off
        return self.pos

    def tell(self):
        return self.pos

    def flush(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class MemFS:
    """Flat in-memory filesystem with the HAL FS interface. Directories are name prefixes."""

    def __init__(self):
        self.files = {}
        self.dirs = {}

    def open(self, path, mode):
        return _MemFile(self, path, mode)

    def rename(self, a, b):
        if a not in self.files:
            raise OSError(2, "ENOENT")
        self.files[b] = self.files.pop(a)

    def remove(self, path):
        if path not in self.files:
            raise OSError(2, "ENOENT")
        del self.files[path]

    def listdir(self, path=""):
        p = path.rstrip("/") + "/" if path else ""
        out = []
        for k in self.files:
            if k.startswith(p) and "/" not in k[len(p):]:
                out.append(k[len(p):])
        return out

    def stat_size(self, path):
        if path not in self.files:
            raise OSError(2, "ENOENT")
        return len(self.files[path])

    def exists(self, path):
        return path in self.files or path in self.dirs

    def mkdir(self, path):
        self.dirs[path] = 1

    def total_bytes(self):
        n = 0
        for v in self.files.values():
            n += len(v)
        return n


class _FailFile:
    def __init__(self, ffs, f):
        self.ffs = ffs
        self.f = f

    def read(self, n=-1):
        self.ffs._check()
        return self.f.read(n)

    def readinto(self, b):
        self.ffs._check()
        if hasattr(self.f, "readinto"):
            return self.f.readinto(b)
        d = self.f.read(len(b))
        b[0:len(d)] = d
        return len(d)

    def write(self, b):
        return self.ffs._write(self.f, b)

    def seek(self, off, whence=0):
        return self.f.seek(off, whence)

    def flush(self):
        self.ffs._check()
        self.f.flush()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class FailingFS:
    """Wraps a filesystem; after `budget` written bytes the power is cut: the write in progress
    lands only up to the budget (a torn write) and every later operation raises PowerCut.
    budget None never fails. `written` counts bytes written so far."""

    def __init__(self, inner, budget=None):
        self.inner = inner
        self.budget = budget
        self.written = 0
        self.dead = False

    def _check(self):
        if self.dead:
            raise PowerCut("power is off")

    def _mutate(self):
        self._check()
        if self.budget is not None and self.written >= self.budget:
            self.dead = True
            raise PowerCut("power cut before operation")

    def _write(self, f, b):
        self._check()
        n = len(b)
        if self.budget is not None and self.written + n > self.budget:
            k = self.budget - self.written
            if k > 0:
                f.write(bytes(b[:k]))
            self.written += max(k, 0)
            self.dead = True
            raise PowerCut("power cut after %d of %d bytes" % (k, n))
        self.written += n
        return f.write(b)

    def open(self, path, mode):
        if "w" in mode or "a" in mode:
            self._mutate()
        else:
            self._check()
        return _FailFile(self, self.inner.open(path, mode))

    def rename(self, a, b):
        self._mutate()
        self.inner.rename(a, b)

    def remove(self, path):
        self._mutate()
        self.inner.remove(path)

    def listdir(self, path=""):
        self._check()
        return self.inner.listdir(path)

    def stat_size(self, path):
        self._check()
        return self.inner.stat_size(path)

    def exists(self, path):
        self._check()
        return self.inner.exists(path)

    def mkdir(self, path):
        self._check()
        self.inner.mkdir(path)


# ---------------------------------------------------------------- signals


class Rng:
    """xorshift32: the same sequence under CPython and MicroPython (small ints only)."""

    def __init__(self, seed=1):
        self.s = (seed * 2654435761 + 1) & 0x3FFFFFFF or 1

    def next(self):
        s = self.s
        s ^= (s & 0x1FFFF) << 13  # mask before the shift: no long int (MicroPython heap)
        s ^= s >> 17
        s ^= (s & 0x1FFFFFF) << 5
        self.s = s or 1
        return self.s

    def below(self, n):
        return self.next() % n if n > 1 else 0


class Signal:
    """Deterministic integer signal: base + triangle wave + seeded noise, all fixed point.

    Faults (set any time): stuck=True repeats the last value; spike_every=N adds spike to every
    Nth sample; missing=True returns None (sensor not answering)."""

    def __init__(self, base, amp=0, period_ms=60000, noise=0, seed=1):
        self.base = base
        self.amp = amp
        self.period = period_ms
        self.noise = noise
        self.rng = Rng(seed)
        self.stuck = False
        self.missing = False
        self.spike_every = 0
        self.spike = 0
        self.n = 0
        self.last = base

    def value(self, t_ms):
        if self.missing:
            return None
        self.n += 1
        if self.stuck:
            return self.last
        v = self.base
        if self.amp and self.period > 0:
            ph = t_ms % self.period
            half = self.period // 2
            # triangle in [-amp, amp]; _muldiv keeps amp * ph from becoming a long int
            if ph < half:
                v += -self.amp + _muldiv(ph, 2 * self.amp, half)
            else:
                v += self.amp - _muldiv(ph - half, 2 * self.amp, half)
        if self.noise:
            v += self.rng.below(2 * self.noise + 1) - self.noise
        if self.spike_every and self.n % self.spike_every == 0:
            v += self.spike
        self.last = v
        return v


def _muldiv(a, k, c):
    """(a * k) // c for 0 <= a <= c, c > 0, with only small ints when a * k would not be one
    (exact long division in base 16; MicroPython: no heap allocation, c < 2**25)."""
    kk = k if k >= 0 else -k
    if a == 0 or kk <= 0x3FFFFFFF // a or c >= 0x2000000:
        return (a * k) // c
    sh = 0
    while (kk >> sh) >= 16:
        sh += 4
    q = 0
    r = 0
    while sh >= 0:
        r = r * 16 + a * ((kk >> sh) & 15)
        q = q * 16 + r // c
        r = r % c
        sh -= 4
    if k < 0:
        return -q - 1 if r else -q
    return q


def default_signals(seed=1):
    return {
        _hal.CH_TEMP: Signal(22000, amp=1500, period_ms=600000, noise=50, seed=seed),
        _hal.CH_HUM: Signal(45000, amp=5000, period_ms=900000, noise=200, seed=seed + 1),
        _hal.CH_POT: Signal(50000, amp=20000, period_ms=120000, noise=100, seed=seed + 2),
    }


# ---------------------------------------------------------------- the simulated board


_MONO = hasattr(time, "monotonic")  # CPython; MicroPython has only ticks


def _mono_ms():
    try:
        return time.monotonic() * 1000.0
    except AttributeError:
        return float(time.ticks_ms())


class SimHal(Hal):
    """A simulated board.

    speed: virtual clock rate (2.0 = sampling and event time run twice as fast as real time);
    network timeouts of the MQTT client stay in real time.
    epoch_ms: true wall time at boot (what NTP answers), default the host clock.
    ntp_ok: whether NTP answers. seed: signal seed. fs: a filesystem (default MemFS).
    """

    name = "sim"

    def __init__(self, seed=1, speed=1.0, epoch_ms=None, ntp_ok=False, fs=None, console=None):
        self.fs = fs if fs is not None else MemFS()
        self.speed = speed
        self.seed = seed
        if epoch_ms is None:
            epoch_ms = int(time.time() * 1000)
        self.epoch_at_boot = epoch_ms
        self.ntp_ok = ntp_ok
        self.ntp_error_ms = 0
        self.signals = default_signals(seed)
        self.wifi_up = True
        self.connections = []
        self.lines = []  # console lines (also printed unless console is False)
        self.print_console = console is not False
        self.boots = 0
        self.resets = 0
        self.wdt_fed = 0
        self.button_pressed = False
        self.led_on = False
        self._rng = Rng(seed + 7)
        self._boot_clock()

    # ---- clock
    def _boot_clock(self):
        self._t0 = _mono_ms()
        self._jump = 0
        if not _MONO:
            self._tk = time.ticks_ms()
            self._tms = 0

    def now_ms(self):
        """Virtual ms since boot (not wrapped)."""
        if not _MONO and self.speed == 1:
            # MicroPython at real speed: integer ticks only (no float per call, no heap use)
            t = time.ticks_ms()
            d = time.ticks_diff(t, self._tk)
            if d > 0:
                self._tk = t
                self._tms += d
            return self._tms + self._jump
        return int((_mono_ms() - self._t0) * self.speed) + self._jump

    def ticks_ms(self):
        return self.now_ms() & 0x3FFFFFFF

    def ticks_diff(self, a, b):
        return ((a - b + 0x20000000) & 0x3FFFFFFF) - 0x20000000

    def advance(self, ms):
        """Jump the virtual clock forward (e.g. to test ticks wrap)."""
        self._jump += ms

    async def sleep_ms(self, ms):
        await asyncio.sleep(ms / 1000.0 / self.speed)

    def true_epoch_ms(self):
        return self.epoch_at_boot + self.now_ms()

    # ---- sensors
    def read(self, ch):
        s = self.signals.get(ch)
        if s is None:
            return None
        return s.value(self.now_ms())

    # ---- network
    def wifi_connect(self, ssid, password):
        pass

    def wifi_connected(self):
        return self.wifi_up

    def set_wifi(self, up):
        """Wi-Fi outage on/off; going down cuts every open connection."""
        self.wifi_up = up
        if not up:
            self.drop_connections()

    def drop_connections(self):
        for w in self.connections:
            try:
                tr = getattr(w, "transport", None)
                if tr is not None:
                    tr.abort()
                else:
                    w.close()
            except Exception:
                pass
        self.connections = []

    async def open_connection(self, host, port):
        if not self.wifi_up:
            raise OSError(113, "EHOSTUNREACH (simulated Wi-Fi down)")
        r, w = await Hal.open_connection(self, host, port)
        self.connections = [c for c in self.connections if not _closing(c)]
        self.connections.append(w)
        return r, w

    def ntp(self, host=None):
        if not self.ntp_ok or not self.wifi_up:
            return None
        return self.true_epoch_ms() + self.ntp_error_ms

    # ---- board
    def led(self, on):
        self.led_on = bool(on)

    def button(self):
        return self.button_pressed

    def wdt_feed(self):
        self.wdt_fed += 1

    def reset(self):
        self.resets += 1

    def rand(self, n):
        return self._rng.below(n)

    def console(self, line):
        self.lines.append(line)
        if len(self.lines) > 2000:
            self.lines = self.lines[-1000:]
        if self.print_console:
            print(line)

    def reboot(self):
        """A new boot: ticks restart at 0, connections drop. Flash (fs) keeps what was written.
        For a power cut, first kill the App (App.kill) so nothing more is written, then reboot."""
        self.drop_connections()
        self.epoch_at_boot = self.true_epoch_ms()
        self._boot_clock()
        self.wifi_up = True
        self.boots += 1


def _closing(w):
    try:
        return w.is_closing()
    except Exception:
        return False
