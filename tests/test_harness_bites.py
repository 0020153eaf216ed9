"""Proof that the dual-runtime harness fails on CPython-only firmware code."""
import os
import shutil

import pytest

from tests import mp_harness
from tests.conftest import ROOT
from tests.test_mpy_cross import compile_all

CPYTHON_ONLY = {
    "dataclass": "from dataclasses import dataclass\n\n@dataclass\nclass Reading:\n    value: int = 0\n",
    "typing": "from typing import List\n\ndef f(x: List[int]) -> int:\n    return 0\n",
}


def _copy_tree(dst):
    for top in ("firmware", "shared", "tests"):
        shutil.copytree(os.path.join(ROOT, top), os.path.join(dst, top),
                        ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.parametrize("kind", sorted(CPYTHON_ONLY))
def test_cpython_only_firmware_module_fails_micropython_run(tmp_path, kind):
    _copy_tree(str(tmp_path))
    with open(os.path.join(str(tmp_path), "firmware", "bite_%s.py" % kind), "w") as f:
        f.write(CPYTHON_ONLY[kind])
    results, summary, proc = mp_harness.run_logic_tests(root=str(tmp_path), modules=("test_wire",))
    assert summary is not None, proc.stderr
    assert results.get(("import", "firmware.bite_" + kind)) == "FAIL"
    assert summary[1] >= 1


def test_cpython_only_syntax_fails_mpy_cross(tmp_path):
    src = tmp_path / "bite_match.py"
    src.write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    assert compile_all([str(src)], str(tmp_path))


def test_cpython_only_construct_in_a_test_fails_it(tmp_path):
    _copy_tree(str(tmp_path))
    with open(os.path.join(str(tmp_path), "tests", "logic", "test_bite.py"), "w") as f:
        f.write("def test_uses_fractions():\n    import fractions\n    assert fractions.Fraction(1, 2)\n")
    results, summary, proc = mp_harness.run_logic_tests(root=str(tmp_path), modules=("test_bite",))
    assert results.get(("test_bite", "test_uses_fractions")) == "FAIL"
