"""The firmware/shared logic tests, run again under the real MicroPython interpreter.

Every test_* function in tests/logic/ becomes one test here; each passes only if
the same function passed under MicroPython. Every firmware/shared module must
also import there.
"""
import importlib
import os

import pytest

from tests import mp_harness
from tests.conftest import REPORT

LOGIC = os.path.join(mp_harness.ROOT, "tests", "logic")


def _cpython_tests():
    out = []
    for f in sorted(os.listdir(LOGIC)):
        if f.startswith("test_") and f.endswith(".py"):
            mod = importlib.import_module("tests.logic." + f[:-3])
            for name in sorted(dir(mod)):
                if name.startswith("test_") and callable(getattr(mod, name)):
                    out.append((f[:-3], name, name in getattr(mod, "MP_SKIP", ())))
    return out


TESTS = _cpython_tests()


@pytest.fixture(scope="module")
def mp_run():
    if not mp_harness.available():
        pytest.fail("MicroPython (npm @micropython/micropython-webassembly-pyscript) is not installed: run the set-up command")
    results, summary, proc = mp_harness.run_logic_tests()
    if summary is None:
        pytest.fail("MicroPython run did not finish:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    REPORT["micropython"] = "MicroPython 1.27 (WebAssembly): %d passed, %d failed, %d skipped (logic tests + module imports)" % summary
    return results, summary, proc


def test_micropython_ran_tests(mp_run):
    results, summary, proc = mp_run
    assert summary[0] > 0, "no test passed under MicroPython"
    failed = [k for k, v in results.items() if v == "FAIL"]
    assert not failed, "failed under MicroPython: %s\n%s" % (failed, proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_module_imports_under_micropython(mp_run):
    results, _, proc = mp_run
    imports = {k[1]: v for k, v in results.items() if k[0] == "import"}
    assert imports, "no module import was checked"
    bad = [m for m, v in imports.items() if v != "PASS"]
    assert not bad, "modules that do not import under MicroPython: %s\n%s" % (bad, proc.stdout[-3000:])


@pytest.mark.parametrize("module,name,skip", TESTS, ids=["%s::%s" % t[:2] for t in TESTS])
def test_logic_under_micropython(mp_run, module, name, skip):
    results = mp_run[0]
    got = results.get((module, name))
    if skip:
        assert got == "SKIP"
        pytest.skip("marked MP_SKIP in tests/logic/%s.py" % module)
    assert got == "PASS", "MicroPython result for %s.%s: %s\n%s" % (module, name, got, _trace(mp_run[2].stdout, module, name))


def _trace(out, module, name):
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line == "MP FAIL %s %s" % (module, name):
            return "\n".join(lines[i:i + 25])
    return ""
