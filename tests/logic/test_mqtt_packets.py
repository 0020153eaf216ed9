# MQTT 3.1.1 packet encoding/decoding (pure functions of firmware/mqtt.py), both runtimes.
from firmware import mqtt, mqttc
from tests.logic.util import raises


def test_varlen_boundaries():
    for n, enc in ((0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
                   (16384, b"\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")):
        assert mqtt.varlen(n) == enc
        assert mqttc.decode_varlen(enc) == (n, len(enc))
    raises(mqtt.MQTTError, mqtt.varlen, 268435456)
    raises(mqtt.MQTTError, mqttc.decode_varlen, b"\xff\xff\xff\xff\x01")
    raises(mqtt.MQTTError, mqttc.decode_varlen, b"\x80")


def test_connect_packet_with_will_and_auth():
    p = mqttc.connect_packet("dev1", 30, True, ("a/b", b"\x01", 1, True), "u", "pw")
    assert p[0] == 0x10
    n, off = mqttc.decode_varlen(p, 1)
    body = p[off:]
    assert len(body) == n
    assert body[:7] == b"\x00\x04MQTT\x04"
    flags = body[7]
    assert flags == 0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40
    assert body[8:10] == b"\x00\x1e"
    assert body[10:] == b"\x00\x04dev1" + b"\x00\x03a/b" + b"\x00\x01\x01" + b"\x00\x01u" + b"\x00\x02pw"


def test_publish_roundtrip_qos0_qos1_dup():
    p0 = mqtt.publish_packet("t/x", b"hello", 0, True)
    assert mqttc.split(p0) == [("publish", "t/x", b"hello", 0, True, False, 0)]
    p1 = mqtt.publish_packet("t/x", b"\x00" * 300, 1, False, False, 513)
    pk = mqttc.split(p1)[0]
    assert pk == ("publish", "t/x", b"\x00" * 300, 1, False, False, 513)
    d = mqttc.set_dup(p1)
    assert mqttc.split(d)[0][5] is True
    raises(mqtt.MQTTError, mqtt.publish_packet, "t", b"", 1, False, False, 0)
    raises(mqtt.MQTTError, mqtt.publish_packet, "t", b"", 2)


def test_control_packets():
    s = mqttc.subscribe_packet(7, [("a/+/ack", 1)])
    assert s == b"\x82\x0c\x00\x07\x00\x07a/+/ack\x01"
    assert mqtt.puback_packet(258) == b"\x40\x02\x01\x02"
    stream = b"\x20\x02\x00\x00" + b"\x40\x02\x00\x05" + b"\x90\x03\x00\x07\x01" + b"\xd0\x00"
    assert mqttc.split(stream) == [("connack", 0, 0), ("puback", 5), ("suback", 7, (1,)), ("pingresp",)]
    raises(mqtt.MQTTError, mqttc.split, b"\x20\x02\x00")
    raises(mqtt.MQTTError, mqtt.parse, 0x34, b"\x00\x01a")  # qos 2
    raises(mqtt.MQTTError, mqtt.parse, 0x32, b"\x00\x05ab")  # truncated topic
