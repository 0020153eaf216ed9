"""The device's RAM budget, measured under the real MicroPython (tools/ram_budget.py): the
modules as tools/deploy.py ships them (.mpy, mpy-cross -O3 -march=xtensawin), the ESP32 HAL on
the virtual board's stub hardware modules, the provisioned default config (and the example
pipeline config: 5 rules, 2 detectors).

Budget (issue 11, docs/firmware.md): kept after start-up <= 48 KiB, every peak <= 64 KiB,
per-sample path 0 bytes, asserted for the default config with the board's figures (the qstr pool
as the stock ESP32 image holds it: tools/qstr_board.py). The example config (5 rules, 2
detectors, rings) is not within it (about 64 KiB kept): a strict xfail, so it turns into a
failure the day it fits and the marker must go then.
"""
import pytest

from tests import mp_harness
from tools import qstr_board, ram_budget

# regression ceilings: the budget for the default config, about 2 KiB above the board figures
# measured on 2026-12-02 for the example config (docs/firmware.md, fifth round)
KEPT_CEILING = {"default": 48 * 1024, "example": 66 * 1024}
# peaks per sub-step (live after the previous sub-step + allocation within it: docs/firmware.md)
PEAK_CEILING = {"default": 64 * 1024, "example": 73 * 1024}


@pytest.fixture(scope="module", params=["default", "example"])
def ram(request):
    if not mp_harness.available():
        pytest.fail("MicroPython (npm) is not installed: run tools/setup.sh")
    cfg = ram_budget.DEFAULT_CONFIG if request.param == "default" else ram_budget.example_cfg()
    r = ram_budget.measure(cfg, timeout=300)
    r["name"] = request.param
    return r


def test_per_sample_path_allocates_nothing(ram):
    assert ram["sample"] == 0


def test_ram_regression_ceiling(ram):
    assert ram["kept"] <= KEPT_CEILING[ram["name"]], ram["kept"]
    for k in ("peak_backlog", "peak_live", "peak_windows", "peak_cep", "peak_full"):
        assert ram[k] <= PEAK_CEILING[ram["name"]], (k, ram[k])


def test_peaks_within_budget_default_config(ram):
    """Replay, live session, window closes, CEP bursts and a full outbox need at most 64 KiB
    (default config)."""
    if ram["name"] != "default":
        pytest.skip("the example config is not within the budget yet (docs/firmware.md)")
    for k in ("peak_backlog", "peak_live", "peak_windows", "peak_cep", "peak_full"):
        assert ram[k] <= ram_budget.PEAK_MAX, (k, ram[k])


def test_modules_shipped_are_device_only(ram):
    shipped = set(ram["files"])
    assert "lib/firmware/hal_sim.mpy" not in shipped
    assert "lib/shared/wire.mpy" not in shipped  # the gateway side of the contract stays off the board
    assert "lib/firmware/cpyticks.mpy" not in shipped
    assert "lib/firmware/obframe.mpy" not in shipped  # frame helpers of tests and tools


def test_ram_budget(ram, request):
    """Kept after start-up <= 48 KiB, every peak <= 64 KiB, per-sample path 0 bytes."""
    if ram["name"] == "example":
        request.applymarker(pytest.mark.xfail(strict=True, reason="the example config's rule, detector and ring "
                                              "code and state: about 64 KiB kept (docs/firmware.md: RAM)"))
    assert not ram_budget.over_budget(ram), ram_budget.over_budget(ram)


def test_module_breakdown_adds_up(ram):
    """tools/ram_budget.py --modules (the table in docs/firmware.md) accounts for the kept heap."""
    if ram["name"] != "default":
        pytest.skip("measured for the default config")
    rows = ram_budget.measure_modules(timeout=300)
    assert [r[0] for r in rows] == list(ram_budget.APP_MODULES) + ["build()", "tasks"]
    total = sum(r[1] for r in rows)
    assert abs(total - ram["kept_wasm"]) <= 4096, (total, ram["kept_wasm"])
    assert all(r[1] > 0 for r in rows[:-1]), rows


def test_qstr_pool_blocks_as_modelled(ram):
    """The board's figures replace the WebAssembly build's qstr pool blocks by the board's
    (tools/qstr_board.py). The pool block sizes the model assumes (20, 40, 80 ... entries, 7
    bytes an entry, 16-byte blocks) are the interpreter's own: at every dump of the run the heap
    bytes of its pools are those the model gives for its number of RAM qstrs."""
    dumps = qstr_board.parse_dumps(ram["stdout"])
    assert len(dumps) == 4, len(dumps)
    for n, strings, pool_heap in dumps:
        assert len(strings) == n
        assert qstr_board.pool_bytes(0, n) == pool_heap, (n, pool_heap)


def test_board_qstrs_counted(ram):
    """The board's pool: every RAM qstr of the window is counted unless it is in the ESP32
    image's ROM (names of machine, network, asyncio, dht ... are), and the qstr tables of the
    modules loaded add what the WebAssembly build's ROM or the stub modules hid."""
    q = ram["qstr"]
    assert 0 < q["rom_on_board"] < q["wasm_qstrs"]
    rom = qstr_board.esp32_rom()
    for name in ("Pin", "WLAN", "isconnected", "ADC", "WDT", "DHT22", "getaddrinfo", "append"):
        assert name in rom, name
    for name in ("firmware", "sample_step", "outbox", "uplink"):
        assert name not in rom, name


def test_board_qstrs_below_the_next_pool_block(ram):
    """The board's RAM qstrs, with every module a board loads in normal operation, stay below
    the count at which its next qstr pool block (640 entries, 4,512 B) is allocated: a cliff of
    4.5 KB the kept figure would take the day a change adds the names (default config)."""
    if ram["name"] != "default":
        pytest.skip("measured for the default config")
    n = ram["qstr_end"]["board_qstrs"]
    size, at = qstr_board.next_block(n)
    assert size == 4512 and n < at, (n, at)
