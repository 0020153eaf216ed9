# Count windows (firmware/window.py has the event-time ones): loaded only when the config has
# a count window (RAM on the board).
from firmware.window import Agg


class CountWindow:
    """Tumbling count window: every `n` samples of one channel (arrival order)."""

    def __init__(self, ch, n, sink):
        self.ch = ch
        self.n = n
        self.sink = sink
        self.agg = Agg()

    def add(self, v, t):
        self.agg.add(v, t)
        if self.agg.n >= self.n:
            self.close()

    def close(self):
        if self.agg.n == 0:
            return
        self.sink.on_count_window(self)
        self.agg.reset()

    def shift(self, dt):
        self.agg.shift(dt)
