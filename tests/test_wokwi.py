"""Offline checks of the Wokwi project (wokwi-cli itself needs the Wokwi cloud and a token)."""
import json
import os
import re

import pytest

from tests.conftest import ROOT
from firmware import pins

W = os.path.join(ROOT, "wokwi")

# board-esp32-devkit-c-v4 pin names (Wokwi's ESP32 DevKitC V4 board)
ESP_GPIO = {0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 25, 26, 27, 32, 33, 34, 35}
ESP_OTHER = {"3V3", "5V", "GND.1", "GND.2", "GND.3", "TX", "RX", "EN", "VP", "VN", "CLK", "D0", "D1",
             "D2", "D3", "CMD"}
ADC1 = {32, 33, 34, 35, 36, 39}
INPUT_ONLY = {34, 35, 36, 39}
# part type -> its pin names and the controls a scenario may set (value range)
PARTS = {
    "board-esp32-devkit-c-v4": (None, {}),
    "wokwi-dht22": ({"VCC", "SDA", "NC", "GND"}, {"temperature": (-40, 80), "humidity": (0, 100)}),
    "wokwi-potentiometer": ({"VCC", "SIG", "GND"}, {"position": (0, 1)}),
    "wokwi-pushbutton": ({"1.l", "2.l", "1.r", "2.r"}, {"pressed": (0, 1)}),
    "wokwi-led": ({"A", "C"}, {}),
    "wokwi-resistor": ({"1", "2"}, {}),
}
# the firmware's pin map (firmware/pins.py) by name, and each name -> (part type, the part's pin
# that carries the signal)
PINS = {"dht22": pins.DHT22_DATA, "pot": pins.POT_ADC, "button": pins.BUTTON, "led": pins.STATUS_LED}
SIGNAL = {"dht22": ("wokwi-dht22", "SDA"), "pot": ("wokwi-potentiometer", "SIG"),
          "button": ("wokwi-pushbutton", None), "led": ("wokwi-led", "A")}


def read(name):
    with open(os.path.join(W, name)) as f:
        return f.read()


@pytest.fixture(scope="module")
def diagram():
    return json.loads(read("diagram.json"))


def _nets(diagram):
    """Connected groups of 'part:pin' endpoints."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in diagram["connections"]:
        a, b = c[0], c[1]
        parent[find(a)] = find(b)
    groups = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return list(groups.values())


def test_diagram_parts_and_pin_names_exist(diagram):
    ids = {}
    for p in diagram["parts"]:
        assert p["type"] in PARTS, p["type"]
        assert p["id"] not in ids
        ids[p["id"]] = p["type"]
    assert "board-esp32-devkit-c-v4" in ids.values()
    for c in diagram["connections"]:
        assert len(c) == 4 and isinstance(c[3], list), c
        for end in c[:2]:
            part, _, pin = end.partition(":")
            if part.startswith("$"):
                assert part == "$serialMonitor" and pin in ("RX", "TX")
                continue
            assert part in ids, end
            names = PARTS[ids[part]][0]
            if names is None:  # the ESP32 board
                assert pin in ESP_OTHER or (pin.isdigit() and int(pin) in ESP_GPIO), end
            else:
                assert pin in names, end
    assert ["esp:TX", "$serialMonitor:RX", "", []] in diagram["connections"]


def test_diagram_matches_firmware_pin_map_both_ways(diagram):
    ids = {p["id"]: p["type"] for p in diagram["parts"]}
    gpio_of = {}  # (part id, pin) -> esp GPIO number on the same net
    wired = set()
    for net in _nets(diagram):
        gpios = [int(e[4:]) for e in net if e.startswith("esp:") and e[4:].isdigit()]
        assert len(gpios) <= 1, net  # never two GPIOs shorted together
        for e in net:
            part, _, pin = e.partition(":")
            if gpios and part != "esp":
                gpio_of[(part, pin)] = gpios[0]
        wired.update(gpios)
    # every pin map entry is wired to its part's signal pin
    for name, gpio in PINS.items():
        ptype, sig = SIGNAL[name]
        found = [(pid, pin) for (pid, pin), g in gpio_of.items()
                 if g == gpio and ids[pid] == ptype and (sig is None or pin == sig)]
        assert found, "%s (GPIO %d) is not wired to a %s" % (name, gpio, ptype)
    # and every GPIO the diagram uses is in the pin map
    assert wired <= set(PINS.values()), wired - set(PINS.values())
    assert pins.POT_ADC in ADC1  # ADC1 still works with Wi-Fi on
    assert pins.BUTTON not in INPUT_ONLY  # needs the internal pull-up
    # the LED has its series resistor to GND
    led = [p for p, t in ids.items() if t == "wokwi-led"][0]
    cathode = [n for n in _nets(diagram) if led + ":C" in n][0]
    assert any(ids.get(e.partition(":")[0]) == "wokwi-resistor" for e in cathode)
    # the button pulls its GPIO to GND
    btn = [p for p, t in ids.items() if t == "wokwi-pushbutton"][0]
    assert any(any(e.startswith("esp:GND") for e in n) and any(e.startswith(btn + ":") for e in n)
               for n in _nets(diagram))


def _toml():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(W, "wokwi.toml"), "rb") as f:
        return tomllib.load(f)


def test_wokwi_toml_names_a_documented_firmware_and_the_rfc2217_port():
    cfg = _toml()["wokwi"]
    assert cfg["version"] == 1
    assert cfg["rfc2217ServerPort"] == 4000
    docs = read("README.md") + open(os.path.join(ROOT, "docs", "deploy.md")).read()
    for key in ("firmware", "elf"):
        name = cfg[key]
        assert re.match(r"^ESP32_GENERIC-\d{8}-v1\.27\.\d+\.bin$", name), name
        # not produced by the build: the user downloads it; the docs say from where
        assert name in docs and "micropython.org/download/ESP32_GENERIC" in docs
    assert "rfc2217://localhost:4000" in docs
    assert "*.bin" in read(".gitignore")  # the downloaded image stays out of git


def _scenario_steps(text):
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        doc = yaml.safe_load(text)
        return doc, doc["steps"]
    # tiny reader for the subset used here: "- key: value" and "- key:" + indented "k: v"
    doc, steps, cur = {}, [], None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        m = re.match(r"^(\w[\w-]*):\s*(.*)$", line)
        if m and not raw.startswith(" "):
            doc[m.group(1)] = _scalar(m.group(2))
            continue
        m = re.match(r"^\s*-\s+([\w-]+):\s*(.*)$", line)
        if m:
            cur = {m.group(1): _scalar(m.group(2)) if m.group(2) else {}}
            steps.append(cur)
            continue
        m = re.match(r"^\s+([\w-]+):\s*(.*)$", line)
        assert m and cur is not None, raw
        list(cur.values())[0][m.group(1)] = _scalar(m.group(2))
    doc["steps"] = steps
    return doc, steps


def _scalar(s):
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def test_scenario_parses_and_drives_parts_of_the_diagram(diagram):
    ids = {p["id"]: p["type"] for p in diagram["parts"]}
    scenarios = [f for f in os.listdir(W) if f.endswith(".test.yaml")]
    assert scenarios
    for name in scenarios:
        doc, steps = _scenario_steps(read(name))
        assert doc["version"] == 1 and doc["name"]
        assert steps[0] == {"wait-serial": "edgeflow boot"}
        assert "wait-serial" in steps[-1] and steps[-1]["wait-serial"].startswith("CEP ")
        controls = set()
        for st in steps:
            assert len(st) == 1, st
            (kind, arg), = st.items()
            assert kind in ("wait-serial", "set-control", "delay", "expect-pin"), kind
            if kind == "delay":
                assert re.match(r"^\d+m?s$", arg), arg
            if kind == "set-control":
                assert set(arg) == {"part-id", "control", "value"}, arg
                ptype = ids[arg["part-id"]]
                lo, hi = PARTS[ptype][1][arg["control"]]
                assert lo <= arg["value"] <= hi, arg
                controls.add((ptype, arg["control"]))
        assert {("wokwi-dht22", "temperature"), ("wokwi-dht22", "humidity"),
                ("wokwi-potentiometer", "position")} <= controls


def test_the_firmware_prints_the_lines_the_scenario_waits_for():
    srcs = ""
    for name in os.listdir(os.path.join(ROOT, "firmware")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "firmware", name)) as f:
                srcs += f.read()
    if "edgeflow boot" not in srcs:
        pytest.skip("the firmware's boot line is not written yet")
    assert re.search(r"[\"']CEP ", srcs), "the scenario waits for a 'CEP ' line the firmware never prints"


def test_documented_wokwi_config_fires_the_cep_the_scenario_waits_for():
    """On paper: the config the Wokwi docs deploy is valid and its rules fire on the values the
    scenario sets (the real pipeline fed those values at the configured sample rate)."""
    import json
    from firmware import config
    from firmware.pipeline import Pipeline
    from shared import wire
    readme = read("README.md")
    assert "edgeflow-deploy --port rfc2217://localhost:4000 --config wokwi/node.json" in readme
    with open(os.path.join(ROOT, "wokwi", "node.json")) as f:
        cfg = config.load(json.load(f))
    _, steps = _scenario_steps(read("scenario.test.yaml"))
    assert not any(s.get("set-control", {}).get("part-id") == "btn1" for s in steps)  # button = safe mode
    vals = {"temperature": 0, "humidity": 0, "position": 0}
    got = []
    p = Pipeline(cfg, lambda kind, t, fl, body: got.append((kind, body)))
    p.set_base(0, False)
    t = 0
    for s in steps:
        if "set-control" in s:
            vals[s["set-control"]["control"]] = s["set-control"]["value"]
        elif "delay" in s or "wait-serial" in s:
            ms = int(str(s.get("delay", "10000ms")).rstrip("ms"))
            for _ in range(ms // cfg["sample_ms"]):
                p.sample(0, int(vals["temperature"] * 1000), t)
                p.sample(1, int(vals["humidity"] * 1000), t)
                p.sample(2, int(vals["position"] * 100000), t)
                p.tick(t)
                t += cfg["sample_ms"]
    ceps = [b[0] for k, b in got if k == wire.KIND_CEP]
    assert "hot" in ceps and "pot_high" in ceps, got
