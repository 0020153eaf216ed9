# Code the HAL runs rarely (firmware/hal_base.py, firmware/hal_esp32.py): the ESP32 HAL's
# set-up, the TLS connect and one NTP query. Imported on demand and unloaded after on
# MicroPython (RAM).
import asyncio


def setup(hal, root):
    """Esp32Hal.__init__: the file system, the sensor drivers, LED, button and the Wi-Fi
    interface; the pins from firmware/pins.py (read here only, unloaded after: RAM)."""
    import machine
    import network
    from firmware import pins
    from firmware.hal import PosixFS, unload
    Pin = machine.Pin
    hal.fs = PosixFS(root)
    hal._adc = machine.ADC(Pin(pins.POT_ADC))
    try:
        hal._adc.atten(machine.ADC.ATTN_11DB)
    except AttributeError:
        pass
    hal._dht = None
    try:
        import dht
        hal._dht = dht.DHT22(Pin(pins.DHT22_DATA))
    except Exception as e:
        print("edgeflow: no DHT22 driver (%r)" % (e,))
    hal._dht_at = None
    hal._dht_ok = False
    hal._led = Pin(pins.STATUS_LED, Pin.OUT)
    hal._btn = Pin(pins.BUTTON, Pin.IN, Pin.PULL_UP)
    hal._wdt = None
    hal._wlan = network.WLAN(network.STA_IF)
    unload("firmware.pins")


async def open_stream(host, port, tls=None, fs=None):
    """asyncio streams to host:port. With tls ({"ca": path, "server_hostname": name}) the session
    trusts only that CA (read from fs at each connect: nothing stays in RAM between sessions) and
    checks the name. The same code runs on MicroPython 1.23+ (ssl over mbedTLS) and CPython."""
    if not tls:
        return await asyncio.open_connection(host, port)
    import ssl
    f = fs.open(tls["ca"].lstrip("/"), "rb")
    try:
        ca = f.read()
    finally:
        f.close()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca.decode())  # PEM text: both runtimes accept it as str
    return await asyncio.open_connection(host, port, ssl=ctx, server_hostname=tls.get("server_hostname") or host)


def ntp(hal, host=None):
    """One SNTP query (blocks up to 0.5 s; DNS once, again after a failure); epoch ms with
    ms resolution, or None."""
    import socket
    import struct
    s = None
    try:
        addr = getattr(hal, "_ntp_addr", None)
        if addr is None:
            addr = hal._ntp_addr = socket.getaddrinfo(host or "pool.ntp.org", 123)[0][-1]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        q = bytearray(48)
        q[0] = 0x1B
        s.sendto(q, addr)
        msg = s.recv(48)
        if len(msg) < 48:
            return None
        secs, frac = struct.unpack_from(">II", msg, 40)  # network order
        if secs == 0:
            return None
        return (secs - 2208988800) * 1000 + (frac * 1000 >> 32)
    except Exception:
        hal._ntp_addr = None
        return None
    finally:
        if s is not None:
            s.close()
