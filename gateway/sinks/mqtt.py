"""MQTT republish sink: one message per row, JSON or SenML (RFC 8428), QoS 1; an outbox item
is deleted only when the broker PUBACKed every message of it.

JSON (format = "json"), e.g. a reading on edgeflow/out/plant-a/readings/node-01:
    {"key": "plant-a/readings/node-01/3/1207", "site": "plant-a", "table": "readings",
     "device": "node-01", "boot": 3, "seq": 1207, "t": 1767225600123, "channel": 0, "flags": 0,
     "value": 21500, "name": "temp", "unit": "Cel", "v": 21.5}
SenML (format = "senml"): a pack with a base name and base time (seconds), units from RFC 8428's
registry: [{"bn": "urn:edgeflow:plant-a:node-01:", "bt": 1767225600.123, "n": "temp",
"u": "Cel", "v": 21.5}]. Node-RED (json node), Home Assistant (MQTT sensor with value_template)
and Telegraf (mqtt_consumer, data_format = "json_v2" or the senml parser... see docs/sinks.md)
read them without custom code. SenML has no field for the idempotency key: receivers that
must dedup use the JSON format (its "key").
"""
import asyncio
import json
import os
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .. import logs
from . import tables as T

# firmware/hal.py channels: value * 1000
DEFAULT_CHANNELS = {0: ("temp", "Cel", 0.001), 1: ("hum", "%RH", 0.001), 2: ("pot", "%", 0.001)}


def channel_map(cfg):
    m = dict(DEFAULT_CHANNELS)
    for k, v in (cfg or {}).items():
        m[int(k)] = (str(v.get("name", "ch%s" % k)), str(v.get("unit", "")), float(v.get("scale", 1.0)))
    return m


def _chan(chans, ch):
    return chans.get(ch) or ("ch%d" % ch, "", 1.0)


def json_row(site, table, row, chans):
    cols = T.TABLES[table][0]
    d = {"key": "%s/%s/%s" % (site, table, T.row_key(table, row)), "site": site, "table": table}
    d.update(zip(cols, row))
    ch = d.get("channel")
    if isinstance(ch, int) and table in ("readings", "anomalies", "window_revisions", "device_windows"):
        name, unit, scale = _chan(chans, ch)
        d["name"], d["unit"] = name, unit
        if table in ("readings", "anomalies"):
            d["v"] = d["value"] * scale
        else:
            for f in ("mean", "min", "max", "std"):
                if d.get(f) is not None:
                    d[f + "_v"] = d[f] * scale
    return d


def senml_row(site, table, row, chans):
    d = dict(zip(T.TABLES[table][0], row))
    if table == "window_revisions":
        name, unit, scale = _chan(chans, d["channel"])
        bn = "urn:edgeflow:%s:%s:%s:" % (site, d["scope"], d["key"])
        pack = [{"bn": bn, "bt": d["start"] / 1000.0, "n": name + "_mean", "u": unit, "v": d["mean"] * scale}]
        pack += [{"n": name + "_min", "u": unit, "v": d["min"] * scale},
                 {"n": name + "_max", "u": unit, "v": d["max"] * scale},
                 {"n": name + "_count", "v": d["count"]}, {"n": "revision", "v": d["revision"]}]
        return pack
    bn = "urn:edgeflow:%s:%s:" % (site, d["device"])
    bt = d.get("t", 0) / 1000.0
    if table == "readings":
        name, unit, scale = _chan(chans, d["channel"])
        return [{"bn": bn, "bt": bt, "n": name, "u": unit, "v": d["value"] * scale}]
    if table == "anomalies":
        name, unit, scale = _chan(chans, d["channel"])
        return [{"bn": bn, "bt": bt, "n": name + "_anomaly", "u": unit, "v": d["value"] * scale},
                {"n": name + "_anomaly_score", "v": d["score"]}]
    if table == "cep_events":
        return [{"bn": bn, "bt": bt, "n": "cep_" + str(d["rule"]), "v": d["severity"]}]
    skip = set(T.TABLES[table][1]) | {"t", "flags"}
    pack = [{"n": k, "v": v} for k, v in d.items() if k not in skip and isinstance(v, (int, float))]
    if pack:
        pack[0] = dict(pack[0], bn=bn + table + ":", bt=bt)
    return pack


class MqttSink:
    def __init__(self, cfg, site):
        self.cfg = cfg
        self.site = site
        self.chans = channel_map(cfg["channels"])
        self.client = None
        self.connected = False

    async def open(self):
        if self.client is not None:
            return
        c = self.cfg
        cid = c["client_id"] or "edgeflow-sink-%s-%s" % (self.site, c["name"])
        cl = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        if c["username"]:
            pw = None
            if c["password_file"]:
                with open(os.path.expanduser(c["password_file"])) as f:
                    pw = f.read().strip()
            cl.username_pw_set(c["username"], pw)
        cl.max_inflight_messages_set(100)
        cl.max_queued_messages_set(0)
        cl.reconnect_delay_set(0.5, 10)

        def on_connect(client, userdata, flags, rc, props):
            self.connected = not rc.is_failure

        def on_disconnect(client, userdata, flags, rc, props):
            self.connected = False

        cl.on_connect = on_connect
        cl.on_disconnect = on_disconnect
        cl.connect_async(c["host"], c["port"], 30)
        cl.loop_start()  # paho's own thread: this sink is off the gateway's data path
        self.client = cl

    def topic(self, table, row):
        d = dict(zip(T.TABLES[table][0], row))
        src = d["device"] if "device" in d else "%s/%s" % (d["scope"], d["key"])
        return self.cfg["topic"].format(site=self.site, table=table, source=src)

    def messages(self, item):
        rows = json.loads(item.body)["rows"]
        enc = senml_row if self.cfg["format"] == "senml" else json_row
        for row in rows:
            yield self.topic(item.table, row), json.dumps(enc(self.site, item.table, row, self.chans),
                                                          separators=(",", ":"))

    async def send(self, items):
        await self.open()
        if not self.connected:
            return [], [], "mqtt sink not connected to %s:%d" % (self.cfg["host"], self.cfg["port"])
        infos = []
        for it in items:
            mine = []
            for topic, payload in self.messages(it):
                info = self.client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return [], [], "publish rc=%d" % info.rc
                mine.append(info)
            infos.append((it, mine))
        deadline = time.monotonic() + self.cfg["timeout_s"]
        done = []
        for it, mine in infos:
            while not all(i.is_published() for i in mine):
                if time.monotonic() > deadline:
                    return done, [], "PUBACK timeout"
                await asyncio.sleep(0.005)
            done.append(it)
        return done, [], ""

    async def close(self):
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
            logs.info("sink_closed", sink=self.cfg["name"], type="mqtt")
