"""virtual board stub, not hardware: the `dht` module of the edgeflow virtual board.

Returns fixed readings (21.5 C, 45.0 %RH). Exists only so firmware modules import on the
virtual board (tools/vboard/).
"""


class DHT22:
    def __init__(self, pin):
        self.pin = pin

    def measure(self):
        pass

    def temperature(self):
        return 21.5

    def humidity(self):
        return 45.0


class DHT11(DHT22):
    pass
