"""The qstr pool as the stock ESP32_GENERIC 1.27 image would hold it, from what the WebAssembly
build interned (tools/ram_budget.py; model and evidence in docs/firmware.md, "RAM").

MicroPython 1.27 (py/qstr.c) keeps interned strings in RAM pools chained after the image's ROM
pools: a new pool is allocated when the last one is full, with twice the last pool's entries.
The last ROM pool of both images is the frozen modules' pool, whose "alloc" field
tools/mpy-tool.py sets to min(entries, 10), so on both the RAM pools hold 20, 40, 80, 160, 320,
640, 1280 ... entries (24 + 7 bytes an entry with 2-byte hashes, in 16-byte GC blocks), and the
string bytes (length + 1) go into chunks of at least 128 bytes. What differs is which strings are
RAM qstrs: each image has its own ROM qstrs (C modules, frozen modules), and the harness's stub
machine/network/dht modules intern about 140 strings before the baseline that the board has in
ROM. So on the board the app's qstrs start at pool entry 0 (its boot interns no RAM qstr: _boot.py
and inisetup.py are frozen), and the first four pools (2,224 bytes) are the app's.
"""
import ast
import os
import re

ROM_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esp32_rom_qstrs.txt")
ENTRY = 7  # bytes per pool entry: const char * + 2-byte hash + 1-byte length
HEADER = 24  # qstr_pool_t before its entries (32-bit)
FIRST = 20  # entries of the first RAM pool (2 x the frozen pool's alloc of 10)
# modules a board loads in normal operation soon after start-up, which the harness's start-up
# (no network, empty flash) does not: the first connect (TLS connect, NTP query), the replay of
# a backlog (after any outage) and the boot scan of stored segments (its frame reader: every
# boot but the first); their qstrs count as interned at start-up
CONNECTED = ("/lib/firmware/halnet.mpy", "/lib/firmware/obread.mpy", "/lib/firmware/obfull.mpy")
_STEP_WORDS = ("backlog", "live", "windows", "cep", "full")


def esp32_rom():
    with open(ROM_FILE, encoding="utf-8") as f:
        return {ast.literal_eval(line) for line in f if not line.startswith("#")}


def _gc(n):
    return (n + 15) // 16 * 16


def pool_bytes(lo, hi):
    """Bytes of the RAM pool blocks allocated while the RAM qstr count goes from lo to hi."""
    total, start, size = 0, 0, FIRST
    while start < hi:
        if start >= lo:
            total += _gc(HEADER + ENTRY * size)
        start += size
        size *= 2
    return total


def next_block(n):
    """(bytes, RAM qstr count at which it is allocated) of the next pool block after n qstrs."""
    start, size = 0, FIRST
    while start < n:
        start += size
        size *= 2
    return _gc(HEADER + ENTRY * size), start


def parse_dumps(stdout):
    """[(n_qstr, [strings], heap bytes of the pool blocks)] of every micropython.qstr_info(1)
    in the output, in order."""
    out = []
    for m in re.finditer(r"^qstr pool: n_pool=\d+, n_qstr=(\d+), n_str_data_bytes=(\d+), "
                         r"n_total_bytes=(\d+)\n((?:Q\(.*?\)\n)*)", stdout, re.M | re.S):
        body = m.group(4)
        strings = body[2:-2].split(")\nQ(") if body else []
        out.append((int(m.group(1)), strings, int(m.group(3)) - int(m.group(2))))
    return out


def _size(s):
    return len(s.encode("utf-8")) + 1


def mpy_tables(root):
    """{"/lib/.../x.mpy": [its qstr table]} of the .mpy files under root (as shipped)."""
    from tools.esp32_qstrs import mpy_qstrs
    out = {}
    for dp, _, names in os.walk(root):
        for n in names:
            if n.endswith(".mpy"):
                with open(os.path.join(dp, n), "rb") as f:
                    out["/" + os.path.relpath(os.path.join(dp, n), root)] = mpy_qstrs(f.read())
    return out


def script_names(src):
    """The names and short strings (what the compiler interns) of a harness script."""
    import io
    import tokenize
    out = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME:
            out.add(tok.string)
        elif tok.type == tokenize.STRING and not tok.string.startswith(("b", "f")):
            v = ast.literal_eval(tok.string)
            if len(v) <= 10:
                out.add(v)
    return out


def board_delta(stdout, tables, rom=None, at=1, harness_at=None, harness_src=""):
    """What the board's heap holds more than the WebAssembly build's at the at-th qstr dump of
    the run (dump 0: the baseline): the wasm's pool blocks and strings since the baseline
    replaced by those the board would allocate (tables: mpy_tables() of the shipped files).
    harness_src: the harness's later steps (their names are the harness's unless a module
    of the app has them too). harness_at: the dump just after the harness's own code (its qstrs are the harness's, since the
    dump before it: they are left out of the board's pool, as its bytes are of every figure).
    Returns a dict of the figures; "delta" is to be added to the wasm's figure."""
    rom = esp32_rom() if rom is None else rom
    dumps = parse_dumps(stdout)
    (n0, s0, _), (n1, s1, _) = dumps[0], dumps[at]
    window = set(s1) - set(s0)
    harness = {s for s in window if s.startswith("RAM ")}  # ram_steps.mjs's own print lines
    if harness_at is not None:
        harness |= set(dumps[harness_at][1]) - set(dumps[harness_at - 1][1])
    window -= harness
    loaded = set()  # the qstr tables of the modules the app loaded (their file names are qstrs)
    for s in window:
        loaded.update(tables.get(s, ()))
    for m in CONNECTED:  # loaded on the board within seconds of start-up, never in the harness
        loaded.update(tables.get(m, ()))
        loaded.update((m, m[5:-4].replace("/", "."), m.split("/")[-1][:-4]))
    # the harness's own print labels ("N live") and names, as far as no module has them
    extra = {s for s in script_names(harness_src) | {"N " + w for w in _STEP_WORDS} if s in window} - loaded
    window -= extra
    harness |= extra
    board = (window | loaded) - rom
    r = {"wasm_qstrs": n1 - n0, "wasm_base_qstrs": n0, "board_qstrs": len(board),
         "wasm_pools": pool_bytes(n0, n1), "board_pools": pool_bytes(0, len(board)),
         "wasm_strings": sum(_size(s) for s in window | harness),
         "board_strings": sum(_size(s) for s in board),
         "rom_on_board": len((window | loaded) & rom), "hidden_on_wasm": len(board - window)}
    r["delta"] = r["board_pools"] - r["wasm_pools"] + r["board_strings"] - r["wasm_strings"]
    return r
