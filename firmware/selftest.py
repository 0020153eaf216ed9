# On-board logic self-test: pure logic, no hardware, no network.
#
#   mpremote connect PORT exec "import firmware.selftest as t; t.run()"
#   mpremote connect PORT run firmware/selftest.py
#
# Each check is small and asserts a real result. A module missing on the board (a partial
# deploy) is reported as SKIP, never as passed. The last line is "selftest: N passed, F failed, S skipped"; run() returns (N, F, S).
# Runs unchanged under CPython (python -m firmware.selftest).


class Skip(Exception):
    pass


def _need(modname, *attrs):
    try:
        mod = __import__(modname, None, None, ["x"])
    except ImportError as e:
        raise Skip("no module " + modname)
    for a in attrs:
        if not hasattr(mod, a):
            raise Skip(modname + " has no " + a)
    return mod


def check_wire_readings():
    w = _need("shared.wire")
    rs = [(7, 1700000000000, 0, 0, 21500), (8, 1700000001000, 1, w.FLAG_UNSYNCED, -45000),
          (10, 1699999999000, 2, 0, 2147483647)]
    buf = w.encode_readings("node-1", 3, rs)
    mtype, dev, boot, out = w.decode_data(buf)
    assert mtype == w.MSG_READINGS, mtype
    assert dev == "node-1" and boot == 3, (dev, boot)
    assert [tuple(r) for r in out] == rs, out
    assert len(buf) == w.HDR_SIZE + len("node-1") + 3 * w.READING_SIZE


def check_wire_rejects_garbage():
    w = _need("shared.wire")
    buf = w.encode_readings("n", 1, [(1, 1000, 0, 0, 5)])
    for bad in (buf[:-1], b"", b"\x00" * len(buf)):
        try:
            w.decode_data(bad)
        except w.WireError:
            continue
        raise AssertionError("decoded garbage %r" % (bad,))


def check_wire_ack():
    w = _need("shared.wire", "encode_ack", "decode_ack")
    a = w.decode_ack(w.encode_ack("n", 4, 99, 1700000000123, 50, 7, b"k" * 32, True))
    assert a[0] == 4 and a[1] == 99 and a[3] == 50 and a[4] and a[6] == 7, a


def check_wire_topics():
    w = _need("shared.wire", "Topics")
    t = w.Topics("site/a")
    assert t.parse(t.data("node-1")) == ("node-1", "data")
    try:
        w.check_device_id("bad/id")
    except w.WireError:
        return
    raise AssertionError("accepted a device id with '/'")


def check_backoff():
    b = _need("firmware.backoff", "Backoff")
    bo = b.Backoff(base_ms=100, cap_ms=1000, rng=lambda n: n - 1)
    got = [bo.next() for _ in range(6)]
    assert got == [100, 200, 400, 800, 1000, 1000], got
    bo.reset()
    assert bo.next() == 100


_TMP = "_selftest"  # scratch folder on the board's flash, removed afterwards


def _rmtree(fs, d):
    try:
        names = fs.listdir(d)
    except OSError:
        return
    for n in names:
        p = d + "/" + n
        try:
            fs.remove(p)
        except OSError:
            _rmtree(fs, p)
    import os
    try:
        os.rmdir(fs._p(d) if hasattr(fs, "_p") else d)
    except OSError:
        pass


def _memfs():
    """A scratch filesystem: the board's flash under _selftest/ (hal_sim is not deployed)."""
    h = _need("firmware.hal", "PosixFS")
    fs = h.PosixFS("")
    _rmtree(fs, _TMP)
    fs.mkdir(_TMP)
    return h.PosixFS(_TMP)


def check_app_starts():
    """Every module the app runs imports, and an App boots and samples on the board's flash
    (no network: the uplink task is not started)."""
    a = _need("firmware.app", "App")
    h = _need("firmware.hal_base", "Hal")
    for m in ("firmware.mqtt", "firmware.uplink", "firmware.clock", "firmware.config", "firmware.identity",
              "firmware.slots", "firmware.outbox", "firmware.pipeline", "shared.wire_dev", "shared.wire_ctl",
              "shared.auth",
              # imported on demand by the running app (boot, connect, NTP, full outbox): a
              # missing file would only show then
              "firmware.obload", "firmware.obfull", "firmware.obread", "firmware.mqttc", "firmware.halnet",
              "firmware.appx", "firmware.cwindow"):
        _need(m)
    try:
        import machine  # noqa: F401 (on a board: the ESP32 HAL must import and build too)
        he = _need("firmware.hal_esp32", "Esp32Hal")
        he.Esp32Hal()
    except ImportError:
        pass
    hal = h.Hal()
    hal.fs = _memfs()
    hal.console = lambda line: None
    cfg = {"device_id": "selftest", "broker": {"host": "127.0.0.1"}, "insecure": True,
           "outbox": {"batch_records": 4}, "channels": ["temp"]}
    try:
        app = a.App(cfg, hal)
        app._boot()
        b0 = app.boot  # random on fresh flash (firmware/identity.py)
        for i in range(6):
            app.sample_step()
        assert app.c["samples"] == 6 and app.c["missing"] == 6, app.c  # the base HAL has no sensor
        app.outbox.flush()
        app2 = a.App(cfg, hal)
        app2._boot()
        assert app2.boot == b0 + 1, (b0, app2.boot)
    finally:
        _rmtree(_need("firmware.hal").PosixFS(""), _TMP)


def check_outbox():
    ob = _need("firmware.outbox", "Outbox")
    box = ob.Outbox(_memfs(), boot=1, batch_records=4)
    try:
        _check_outbox(box)
    finally:
        _rmtree(_need("firmware.hal").PosixFS(""), _TMP)


def _check_outbox(box):
    if hasattr(box, "load"):
        box.load()
    seqs = [box.append(1, 1700000000000 + i * 1000, 0, (0, 20000 + i), i * 1000) for i in range(6)]  # 1: a reading
    assert seqs == [0, 1, 2, 3, 4, 5], seqs
    box.flush()
    assert box.stored_records() == 6, box.stored_records()
    assert box.on_ack(1, 3)
    assert box.unacked() == 2, box.unacked()


def check_ring():
    m = _need("firmware.ring", "Ring")
    r = m.Ring(4)
    for v in range(6):
        r.push(v)
    assert r.n == 4 and r.overwritten == 2, (r.n, r.overwritten)
    assert r.latest(0) == 5 and r.at(0) == 2, (r.latest(0), r.at(0))
    assert r.min() == 2 and r.max() == 5 and r.sum() == 14


def check_window():
    m = _need("firmware.window", "EventWindow")
    w = _need("shared.wire")
    got = []
    p = _need("firmware.pipeline", "Pipeline")
    pl = p.Pipeline({"channels": {"temp": 0}, "window": {"size_ms": 1000}, "rules": []},
                    lambda kind, t, flags, body: got.append((kind, t, body)))
    pl.set_base(0, True)
    for i, v in enumerate((1000, 3000, 2000)):
        pl.sample(0, v, 100 + i * 300)  # [0, 1000): three samples
    pl.sample(0, 9000, 1000)  # exactly at the end: next window, closes the first
    assert len(got) == 1, got
    kind, t, body = got[0]
    assert kind == w.KIND_WINDOW and t == 0, got
    assert body[2] == 3 and body[3] == 1000 and body[4] == 3000 and body[5] == 2000, body


def check_cep():
    p = _need("firmware.pipeline", "Pipeline", "ConfigError")
    w = _need("shared.wire")
    got = []
    cfg = {"channels": {"temp": 0, "hum": 1}, "window": {"size_ms": 60000}, "rules": [
        {"id": "hot_then_dry", "type": "sequence", "first": {"channel": "temp", "op": ">", "value": 30},
         "then": {"channel": "hum", "op": "<", "value": 20}, "within_ms": 10000, "severity": 3}]}
    pl = p.Pipeline(cfg, lambda kind, t, flags, body: got.append((kind, t, body)))
    pl.set_base(0, True)
    pl.sample(0, 31000, 1000)
    pl.sample(1, 19000, 11000)  # exactly within_ms later: inclusive
    cep = [g for g in got if g[0] == w.KIND_CEP]
    assert len(cep) == 1 and cep[0][2][0] == "hot_then_dry" and cep[0][2][2] == 10000, got
    try:
        p.Pipeline({"channels": {"temp": 0}, "rules": [{"id": "x", "type": "nope"}]}, None)
    except p.ConfigError:
        return
    raise AssertionError("unknown rule type accepted")


def check_pipeline():
    p = _need("firmware.pipeline", "Pipeline")
    ex = _need("firmware.pexample", "example_config")
    got = []
    pl = p.Pipeline(ex.example_config(), lambda kind, t, flags, body: got.append(kind))
    pl.set_base(1767225600000, True)
    for i in range(200):
        pl.sample(0, 21000 + (i % 5), i * 100)
        pl.sample(1, 45000, i * 100)
        pl.tick(i * 100)
    assert pl.late == 0 and pl.unknown == 0, (pl.late, pl.unknown)
    pl.flush(20000)
    assert got, "flush emitted no window"


CHECKS = (check_app_starts, check_wire_readings, check_wire_rejects_garbage, check_wire_ack, check_wire_topics,
          check_backoff, check_outbox, check_ring, check_window, check_cep, check_pipeline)


def run(verbose=True):
    passed = failed = skipped = 0
    for fn in CHECKS:
        name = fn.__name__[6:]
        try:
            fn()
            passed += 1
            if verbose:
                print("PASS", name)
        except Skip as e:
            skipped += 1
            if verbose:
                print("SKIP", name, "-", e)
        except Exception as e:
            failed += 1
            print("FAIL", name, "-", type(e).__name__, e)
    print("selftest: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return passed, failed, skipped


if __name__ == "__main__":
    run()
