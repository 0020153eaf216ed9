# Device config validation (firmware/config.py), both runtimes.
import json
from firmware import config
from tests.logic.util import raises

BASE = {"device_id": "node-1", "wifi": {"ssid": "lab", "password": "secret123"},
        "broker": {"host": "192.168.1.10", "port": 8883, "user": "node-1", "password": "pw-0123456789",
                   "tls": {"ca": "/ca.pem", "server_hostname": "edgeflow-broker"}},
        "ack_key": "3c" * 32}


def _cfg(**kw):
    c = json.loads(json.dumps(BASE))
    for k, v in kw.items():
        c[k] = v
    return c


def test_defaults_filled_and_json_text_accepted():
    c = config.load(json.dumps(BASE))
    assert c["device_id"] == "node-1"
    assert c["prefix"] == "edgeflow" and c["sample_ms"] == 1000
    assert c["broker"]["keepalive_s"] == 30 and c["broker"]["client_id"] == "node-1"
    assert c["outbox"]["max_bytes"] == 262144 and c["outbox"]["batch_records"] == 64
    assert c["channels"] == ["temp", "hum", "pot"]
    assert c["clock"]["use_beacon"] is True
    assert config.load(c) == c  # a loaded config loads again unchanged


def test_example_file_is_valid():
    import os
    for p in ("firmware/config.example.json", "/lib/firmware/config.example.json"):
        try:
            f = open(p)
        except OSError:
            continue
        with f:
            c = config.load(f.read())
        assert c["device_id"]
        return
    raise AssertionError("config.example.json not found")


def _err(src):
    return raises(config.ConfigError, config.load, src)


def test_errors_name_the_field_and_reason():
    e = _err(_cfg(broker={"host": "h", "port": 70000}))
    assert e.path == "broker.port" and "1..65535" in str(e), str(e)
    assert str(e).startswith("config.broker.port: ")
    assert _err(_cfg(device_id="a/b")).path == "device_id"
    assert _err({"wifi": {}}).path == "device_id"
    assert _err(_cfg(broker={"port": 1})).path == "broker.host"
    assert _err(_cfg(sample_ms="fast")).path == "sample_ms"
    assert _err(_cfg(sample_ms=True)).path == "sample_ms"
    assert _err(_cfg(channels=["temp", "co2"])).path == "channels[1]"
    assert _err(_cfg(channels=["temp", "temp"])).path == "channels[1]"
    assert _err(_cfg(samplems=5)).path == "samplems"
    assert _err(_cfg(outbox={"batch_recods": 3})).path == "outbox.batch_recods"
    assert _err(_cfg(outbox={"max_bytes": 8192, "segment_bytes": 8192})).path == "outbox.segment_bytes"
    assert _err(_cfg(wifi={"ssid": "x", "password": "short"})).path == "wifi.password"
    assert _err(_cfg(rules={"a": 1})).path == "rules"
    assert _err("{not json").path == "json"
    assert _err("[1]").path == "json"
    assert _err(_cfg(watchdog_ms=500)).path == "watchdog_ms"
    assert _err(_cfg(uplink={"backoff_base_ms": 5000, "backoff_cap_ms": 100})).path == "uplink.backoff_cap_ms"


HOT = {"id": "hot", "type": "threshold", "channel": "temp", "enter": 30.0, "leave": 29.0, "severity": 2}


def test_pipeline_sections_pass_through_and_are_validated_by_the_pipeline():
    c = config.load(_cfg(window={"size_ms": 10000}, rules=[HOT], _comment="x"))
    assert c["window"] == {"size_ms": 10000} and c["rules"] == [HOT] and c["_comment"] == "x"
    bad = dict(HOT)
    del bad["type"]
    e = _err(_cfg(rules=[bad]))
    assert e.path == "rules.hot" and "type" in e.reason, str(e)
    assert _err(_cfg(window={"size_ms": -1})).path == "window"


def test_channels_as_a_map():
    c = config.load(_cfg(channels={"temp": 4, "pot": 7}))
    assert config.channel_map(c) == [("temp", 4), ("pot", 7)]
    assert config.channel_map(config.load(_cfg())) == [("temp", 0), ("hum", 1), ("pot", 2)]
    assert _err(_cfg(channels={"co2": 1})).path == "channels.co2"


def test_tls_and_credentials_required_unless_insecure():
    c = config.load(BASE)
    assert c["broker"]["tls"] == {"ca": "/ca.pem", "server_hostname": "edgeflow-broker"} and c["insecure"] is False
    b = dict(BASE["broker"])
    del b["tls"]
    assert _err(_cfg(broker=b)).path == "broker.tls"
    nokey = _cfg()
    del nokey["ack_key"]
    assert _err(nokey).path == "ack_key"  # unsigned acks only with "insecure": true
    assert "ack_key" not in config.load(dict(nokey, insecure=True))
    assert config.load(_cfg(broker=b, insecure=True))["insecure"] is True
    for k in ("user", "password"):
        b = dict(BASE["broker"])
        del b[k]
        assert _err(_cfg(broker=b)).path == "broker.user"
    for tls, path in (({"ca": "ca.pem"}, "broker.tls.ca"), ({"ca": "/../x"}, "broker.tls.ca"),
                      ({}, "broker.tls.ca"), ({"ca": 5}, "broker.tls.ca"), ("/ca.pem", "broker.tls"),
                      ({"ca": "/ca.pem", "verify": False}, "broker.tls.verify"),
                      ({"ca": "/ca.pem", "server_hostname": ""}, "broker.tls.server_hostname")):
        assert _err(_cfg(broker=dict(BASE["broker"], tls=tls))).path == path, tls
    # the name checked defaults to the host
    t = config.load(_cfg(broker=dict(BASE["broker"], tls={"ca": "/ca.pem"})))["broker"]["tls"]
    assert t["server_hostname"] == "192.168.1.10"
    assert _err(_cfg(insecure="yes")).path == "insecure"


def test_broker_hosts_list_for_failover():
    def broker(**kw):
        b = dict(BASE["broker"], **kw)
        if b.get("host") is None:
            del b["host"]
            del b["port"]
        return _cfg(broker=b)
    c = config.load(broker(host="10.0.0.1", hosts=["10.0.0.2", "10.0.0.3:8884", "10.0.0.1"]))
    assert c["broker"]["hosts"] == [["10.0.0.1", 8883], ["10.0.0.2", 8883], ["10.0.0.3", 8884]]
    c = config.load(broker(host=None, hosts=["a:1", "b:2"]))  # no host: the first of the list
    assert c["broker"]["host"] == "a" and c["broker"]["port"] == 1
    assert c["broker"]["hosts"] == [["a", 1], ["b", 2]]
    assert config.load(c) == c
    assert config.load(_cfg())["broker"]["hosts"] == [["192.168.1.10", 8883]]
    for bad in (["h:0"], ["h:65536"], ["h:x"], [":1883"], [""], [5], "h", ["h"] * 9):
        assert _err(broker(host="h", hosts=bad)).path.startswith("broker.hosts"), bad
