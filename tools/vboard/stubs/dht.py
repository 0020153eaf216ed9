"""virtual board stub, not hardware: the `dht` module of the edgeflow virtual board.

Same interface as MicroPython's drivers/dht: measure() fills the 5-byte frame `buf` (humidity
and temperature in tenths, then a checksum) and raises a plain Exception("checksum error") on a
bad checksum, OSError when the sensor does not answer; humidity() / temperature() decode `buf`.
Fixed readings (21.5 C, 45.0 %RH). Set `fail` to "checksum" or "timeout" to inject errors.
"""


class DHTBase:
    def __init__(self, pin):
        self.pin = pin
        self.buf = bytearray(5)
        self.fail = None

    def measure(self):
        if self.fail == "timeout":
            raise OSError(110)  # ETIMEDOUT, as dht_readinto raises
        b = self.buf
        b[0], b[1], b[2], b[3] = 0x01, 0xC2, 0x00, 0xD7  # 45.0 %RH, 21.5 C (DHT22 layout)
        b[4] = (b[0] + b[1] + b[2] + b[3]) & 0xFF
        if self.fail == "checksum":
            b[4] ^= 0xFF
        if (b[0] + b[1] + b[2] + b[3]) & 0xFF != b[4]:
            raise Exception("checksum error")


class DHT11(DHTBase):
    def humidity(self):
        return self.buf[0]

    def temperature(self):
        return self.buf[2]


class DHT22(DHTBase):
    def humidity(self):
        return (self.buf[0] << 8 | self.buf[1]) * 0.1

    def temperature(self):
        t = ((self.buf[2] & 0x7F) << 8 | self.buf[3]) * 0.1
        if self.buf[2] & 0x80:
            t = -t
        return t
