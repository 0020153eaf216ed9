"""The compiled build of gateway/batch.py (setup.py, gateway/accel.py) against the pure Python one:
same results at the limits, a stale build never shadows an edited source, the gateway's data path
gives the same outputs with either."""
import importlib
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from gateway import accel, service
from gateway import batch as pure
from shared import wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I32 = (-2 ** 31, 2 ** 31 - 1)


def _compiled(name="batch"):
    """gateway._c_<name> if it was built (pip install -e . with a C compiler), else None."""
    try:
        return importlib.import_module("gateway._c_" + name)
    except ImportError:
        return None


def _all_compiled():
    """{name: compiled module} of every module of accel.MODULES, or None if one is not built."""
    mods = {name: _compiled(name) for name in accel.MODULES}
    return None if None in mods.values() else mods


def _merge(aggs):
    """A channel may appear in several entries of the pure path (they add): one per channel."""
    m = {}
    for ch, n, s, sq, mn, mx in aggs:
        if ch in m:
            o = m[ch]
            m[ch] = (o[0] + n, o[1] + s, o[2] + sq, min(o[3], mn), max(o[4], mx))
        else:
            m[ch] = (n, s, sq, mn, mx)
    return m


def _payload(rng, n):
    recs = [(k, rng.choice([I32[0], I32[1], rng.randrange(-2 ** 31, 2 ** 31), rng.randrange(-3, 3)]),
             rng.choice([0, 1, 2, 255, rng.randrange(256)]), rng.choice([0, 1, 2, 255]),
             rng.choice([I32[0], I32[1], 0, -1, rng.randrange(-2 ** 31, 2 ** 31)])) for k in range(n)]
    head = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    return head + b"".join(struct.pack(">HiBBi", *r) for r in recs), len(head)


def test_the_byte_loops_equal_the_struct_path_at_every_limit():
    """_scan_bytes/_aggs_bytes (C when compiled; also run here as Python) against struct unpacking
    and Python ints: int32 extremes, every channel byte, the largest payload (5,461 readings of
    |v| = 2^31: sums of squares past 64 bits), seq offsets that are not 0..n-1."""
    comp = _compiled()
    mods = [pure] + ([comp] if comp else [])
    rng = random.Random(16)
    cases = [1, 2, 3, 50, 5461] + [rng.randrange(1, 300) for _ in range(60)]
    for n in cases:
        p, off = _payload(rng, n)
        src, toffs, fl = pure.scan(p, off, n)
        assert src is not None and len(toffs) == n
        spans = [(0, n)] + [sorted(rng.sample(range(n + 1), 2)) for _ in range(3) if n > 1]
        for mod in mods:
            assert mod._scan_bytes(p, off, n) == (None, toffs, fl)
            for i, j in spans:
                if i < j:
                    want = _merge(pure.aggs(src, p, off, i, j, rng.randrange(1, 5))[0])
                    assert _merge(mod._aggs_bytes(p, off, i, j)) == want
                    assert mod.columns(None, p, off, i, j) == pure.columns(src, p, off, i, j)
    big = b"".join(struct.pack(">HiBBi", k, 0, 7, 0, I32[0]) for k in range(5461))
    for mod in mods:
        assert mod._aggs_bytes(big, 0, 0, 5461) == [(7, 5461, 5461 * I32[0], 5461 * 2 ** 62, I32[0], I32[0])]
        # a seq offset out of place: not the common batch, both paths say so
        bad = bytearray(big[:120])
        bad[12 * 4:12 * 4 + 2] = (9).to_bytes(2, "big")
        assert mod._scan_bytes(bytes(bad), 0, 10) is None
        assert pure.scan(bytes(bad), 0, 10) is None


def _batch(dev, boot, base, base_t, recs, kind=wire.MSG_READINGS, idlen=None):
    d = dev.encode()
    return struct.pack(">BBBBIIqH", wire.MAGIC, wire.VERSION, kind, len(d) if idlen is None else idlen, boot, base,
                       base_t, len(recs)) + d + b"".join(struct.pack(">HiBBi", *r) for r in recs)


def test_the_header_parse_equals_the_struct_path_at_every_limit():
    """head(): every header field at 0, max and max+1 where it has one (boot, base seq + n past
    2^32, base time at both int64 ends plus int32 offsets: Python ints, never wrapped), a wrong
    id, id length, type, size, a seq offset out of place, times in and out of order."""
    comp = _compiled()
    rng = random.Random(5)
    I64 = (-2 ** 63, 2 ** 63 - 1)
    cases = []
    for boot in (0, 1, 2 ** 32 - 1):
        for base_t in (I64[0], I64[1], 0, 1767225600000, -1):
            for n in (1, 2, 50):
                for base in (0, 2 ** 32 - n, 2 ** 32 - n + 1 if n > 1 else 2 ** 32 - 1):
                    toffs = [rng.choice([I32[0], I32[1], 0, -1, rng.randrange(-9999, 9999)]) for _ in range(n)]
                    if rng.random() < 0.5:
                        toffs.sort()
                    recs = [(k, toffs[k], rng.randrange(256), rng.choice([0, 1, 2, 128, 255]),
                             rng.choice(I32)) for k in range(n)]
                    cases.append(("dev%d" % n, _batch("dev%d" % n, boot, base, base_t, recs)))
    good = _batch("ab", 1, 0, 1767225600000, [(0, 5, 1, 0, 7), (1, 6, 2, 0, 8)])
    cases += [("ab", good), ("ac", good), ("a", good), ("ab", good + b"x"), ("ab", good[:-1]), ("ab", good[:21]),
              ("ab", _batch("ab", 1, 0, 0, [(0, 5, 1, 0, 7), (2, 6, 2, 0, 8)])),
              ("ab", _batch("ab", 1, 0, 0, [])), ("ab", _batch("ab", 1, 0, 0, [(0, 0, 0, 0, 0)], idlen=3)),
              ("ab", _batch("ab", 1, 0, 0, [(0, 0, 0, 0, 0)], kind=wire.MSG_RECORDS)),
              ("ab", b"\x00" + good[1:]), ("ab", good[:1] + b"\x09" + good[2:])]
    seen = 0
    for dev, p in cases:
        want = pure.head(p, dev.encode())
        for mod in [pure] + ([comp] if comp else []):
            got = mod._head_bytes(p, dev.encode())
            if want is None:
                assert got is None
                continue
            assert got[:5] + got[7:] == want[:5] + want[7:]
            assert got[6] in (None, want[6]) and mod.scan(p, want[4], want[3])[1] == want[6]
            h = mod.head(p, dev.encode())
            assert h[:5] + h[7:] == want[:5] + want[7:] and h[6] in (None, want[6])
            seen += 1
        if want is not None:
            boot, base, base_t, n, off, src, toffs, fl, tmin, tmax, ordered = want
            assert (tmin, tmax, ordered) == (base_t + min(toffs), base_t + max(toffs), list(toffs) == sorted(toffs))
            assert base + n <= 2 ** 32 and n == len(toffs)
    assert seen > 50


@pytest.mark.parametrize("name", accel.MODULES)
def test_the_built_module_is_compiled_from_the_sources_on_disk(name):
    comp = _compiled(name)
    py = importlib.import_module("gateway." + name)
    if comp is None:
        why = "gateway._c_%s not built (no Cython or no C compiler at pip install): pure Python only" % name
        if os.environ.get("CI"):  # .ci/run installs gcc and python3-dev: a skipped build is a failure there
            pytest.fail(why)
        pytest.skip(why)
    if comp.SOURCE_SHA256 != accel.source_digest(py.__file__):
        pytest.fail("gateway/_c_%s is older than gateway/%s.py or .pxd: rebuild with pip install -e ." % (name, name))
    # the .pxd was applied: C functions and C classes, not Python ones
    if name == "batch":
        assert comp.COMPILED and not pure.COMPILED
        assert hasattr(pure, "_i32") and not hasattr(comp, "_i32")
    elif name == "mqttc":  # C functions (cpdef), not Python ones
        assert type(comp.cut).__name__ == "cython_function_or_method" and type(py.cut).__name__ == "function"
    else:
        cls, attr = {"windows": ("WindowSet", "keys"), "watermark": ("Watermarks", "devs"),
                     "datapath": ("DataPath", "dedup")}[name]
        # a C class: its attributes are C fields (descriptors on the type), not instance dict entries
        assert type(vars(getattr(comp, cls)).get(attr)).__name__ == "getset_descriptor"
        assert attr not in vars(getattr(py, cls))
    if not os.environ.get(accel.PURE_ENV):
        assert getattr(accel, name) is comp and accel.STATUS[name] == "compiled"


def _stamp(py):
    return "\nSOURCE_SHA256 = %r\n" % accel.source_digest(py)


def _probe(pkg_root, env=None):
    code = ("import sys; sys.path.insert(0, %r); from gateway import accel; "
            "print(accel.STATUS['batch']); print(accel.batch.__file__)") % pkg_root
    e = {k: v for k, v in os.environ.items() if k != accel.PURE_ENV}
    e.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=e,
                         cwd=pkg_root)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), out.stderr


def _copy_pkg(tmp_path):
    g = tmp_path / "gateway"
    g.mkdir()
    (g / "__init__.py").write_text("")
    for f in ("accel.py", "batch.py", "batch.pxd"):
        shutil.copy(os.path.join(ROOT, "gateway", f), g / f)
    return g


def test_a_stale_compiled_module_never_shadows_an_edited_source(tmp_path):
    """The twin's name is _c_batch, never batch: importing gateway.batch always gets the .py, and
    accel takes the twin only while its stamp equals the .py + .pxd on disk. Shown with a Python
    stand-in for the twin (always), and with the real built extension when there is one."""
    g = _copy_pkg(tmp_path)
    (g / "_c_batch.py").write_text((g / "batch.py").read_text() + _stamp(str(g / "batch.py")) +
                                   "STAND_IN = True\n")
    lines, _ = _probe(str(tmp_path))
    assert lines == ["compiled", str(g / "_c_batch.py")]
    with open(g / "batch.py", "a") as f:
        f.write("# edited after the build\n")
    lines, err = _probe(str(tmp_path))
    assert lines[0].startswith("pure (compiled module is stale") and lines[1] == str(g / "batch.py")
    assert "running the Python source" in err
    (g / "batch.py").write_text(open(os.path.join(ROOT, "gateway", "batch.py")).read())
    with open(g / "batch.pxd", "a") as f:  # the C types changed: stale too
        f.write("# edited\n")
    assert _probe(str(tmp_path))[0][0].startswith("pure (compiled module is stale")
    lines, _ = _probe(str(tmp_path), {accel.PURE_ENV: "1"})
    assert lines[0] == "pure (%s)" % accel.PURE_ENV

    comp = _compiled()
    if comp is None or comp.SOURCE_SHA256 != accel.source_digest(pure.__file__):
        return  # the real extension: only when built from these sources (the test above says so)
    shutil.rmtree(g)
    g = _copy_pkg(tmp_path)
    shutil.copy(comp.__file__, g / os.path.basename(comp.__file__))
    lines, _ = _probe(str(tmp_path))
    assert lines == ["compiled", str(g / os.path.basename(comp.__file__))]
    with open(g / "batch.py", "a") as f:
        f.write("\n")
    lines, _ = _probe(str(tmp_path))
    assert lines[0].startswith("pure (compiled module is stale") and lines[1] == str(g / "batch.py")


def _workload():
    """A few devices: in-order batches that cross windows, an out-of-order batch, duplicates,
    part-duplicates, unsynced and future readings, a batch with a seq gap."""
    from tests.test_gateway_fakes import T0
    rng = random.Random(7)
    msgs = []
    for dev in ("a1", "b2", "c3"):
        msgs.append((wire.Topics().hello(dev), wire.encode_hello(dev, 1, 0, T0, 0, 1, 0, 5, 5, "t")))
    seq = {d: 0 for d in ("a1", "b2", "c3")}
    t = {d: T0 for d in seq}
    for r in range(60):
        for dev in seq:
            n = rng.choice([1, 3, 17, 50])
            recs = []
            for k in range(n):
                t[dev] += rng.choice([0, 333, 1000, 2500])
                recs.append((seq[dev] + k, t[dev] + rng.choice([0] * 8 + [-4000, -30000]), k % 3,
                             rng.choice([0] * 20 + [wire.FLAG_UNSYNCED, 2]), rng.randrange(-2 ** 31, 2 ** 31)))
            if r % 13 == 5:
                recs[-1] = recs[-1][:1] + (T0 + 10 ** 9,) + recs[-1][2:]  # days ahead: quarantined
            p = wire.encode_readings(dev, 1, recs)
            msgs.append((wire.Topics().data(dev), p))
            if r % 7 == 3:
                msgs.append((wire.Topics().data(dev), p))  # a duplicate
            if r % 11 == 4 and n > 2:  # part-duplicate: the last two again with the next ones
                seq[dev] += n
                continue
            seq[dev] += n
    return msgs


def _outputs():
    """(accel.summary(), every output row and state export of the data path on _workload()), in
    this process: with the build accel picked (EDGEFLOW_PURE_PYTHON decides)."""
    import asyncio
    from tests.test_gateway_fakes import T0
    from tests.test_gateway_pipeline import StubIngest
    cfg = {"store": {"path": ":memory:", "retain_readings": True}, "metrics": {"port": 0},
           "watermark": {"out_of_orderness_ms": 2000, "idle_timeout_ms": 10 ** 9},
           "windows": {"size_ms": 10000, "allowed_lateness_ms": 5000,
                       "groups": [{"name": "g", "devices": ["*"], "channel": 1}]}}

    async def go():
        gw = service.Gateway(cfg)
        assert type(gw.dev_windows) is accel.windows.WindowSet and type(gw.watermarks) is accel.watermark.Watermarks
        assert isinstance(gw, accel.datapath.DataPath)
        gw.ingest = StubIngest()
        gw._loop = asyncio.get_running_loop()
        for topic, p in _workload():
            gw._handle(topic.encode(), p, T0 + 10 ** 7)
        o = gw.out
        exp = [ws.export() for ws in (gw.dev_windows, gw.group_windows)]
        return (o.readings, o.reading_spans, o.unsynced, o.late, [q[:7] for q in o.quarantine], o.records,
                sorted(o.touched), exp, gw.dedup.export(), gw.watermarks.export(), gw.devices.export())
    return accel.summary(), asyncio.run(go())


def _outputs_in_process(pure):
    """_outputs() in a fresh interpreter, compiled (every module of accel.MODULES) or pure."""
    import pickle
    e = {k: v for k, v in os.environ.items() if k != accel.PURE_ENV}
    e["PYTHONHASHSEED"] = "0"  # the exports list sets: the same order in both interpreters
    if pure:
        e[accel.PURE_ENV] = "1"
    code = "import pickle, sys; from tests.test_accel import _outputs; sys.stdout.buffer.write(pickle.dumps(_outputs()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=e, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()
    return pickle.loads(out.stdout)


def test_the_gateway_gives_the_same_outputs_compiled_and_pure():
    """Every output row and every state export of the data path, with the compiled modules (batch
    loops, windows, watermarks, the data path) and with the pure Python ones (the fallback of a
    build without a C compiler), each in its own interpreter."""
    if _all_compiled() is None:
        pytest.skip("gateway._c_* not built: only the pure path exists")
    ca, a = _outputs_in_process(False)
    cb, b = _outputs_in_process(True)
    assert ca == ", ".join("%s=compiled" % m for m in sorted(accel.MODULES))
    assert cb == ", ".join("%s=pure (%s)" % (m, accel.PURE_ENV) for m in sorted(accel.MODULES))
    assert a[0] and a[3] and a[4] and a[7][0][2]  # raw rows, late rows, quarantine, window results
    assert a == b


def test_the_window_and_watermark_unit_tests_pass_compiled(monkeypatch):
    """tests/test_gateway_units.py's window and watermark tests (Flink's boundaries, revisions,
    idleness, the brute-force watermark model) against the compiled classes too."""
    from tests import test_gateway_units as units
    win, wm = _compiled("windows"), _compiled("watermark")
    if win is None or wm is None:
        pytest.skip("gateway._c_windows / _c_watermark not built: only the pure path exists")
    monkeypatch.setattr(units, "WindowSet", win.WindowSet)
    monkeypatch.setattr(units, "Watermarks", wm.Watermarks)
    ran = 0
    for name in sorted(vars(units)):
        if name.startswith(("test_window", "test_watermark")):
            getattr(units, name)()
            ran += 1
    assert ran >= 12 and type(units.ws()) is win.WindowSet
