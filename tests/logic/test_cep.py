# CEP rules: loading/validation, threshold hysteresis, sequence, count, absence, rate.
from firmware.cep import load_rules, load_rule, ConfigError
from tests.logic.util import raises

CH = {"temp": 0, "hum": 1, "pot": 2}


class Sink:
    def __init__(self):
        self.out = []

    def on_cep(self, rule, t, span, evidence):
        self.out.append((rule.id, t, span, evidence))


def _one(d):
    k = Sink()
    return load_rule(d, CH, k), k


def test_thresholds_converted_to_fixed_point_at_load():
    r, _ = _one({"id": "hot", "type": "threshold", "channel": "temp", "enter": 30.5, "leave": 28})
    assert r.enter == 30500 and r.leave == 28000 and r.severity == 1


def test_config_errors_name_rule_and_reason():
    cases = [
        ({"id": "x", "type": "nope", "channel": "temp"}, "unknown rule type"),
        ({"id": "x", "type": "threshold", "channel": "temp"}, "missing field 'enter'"),
        ({"id": "x", "type": "threshold", "channel": "wind", "enter": 1}, "unknown channel"),
        ({"id": "x", "type": "threshold", "channel": "temp", "enter": "hot"}, "must be a number"),
        ({"id": "x", "type": "threshold", "channel": "temp", "enter": 30, "leave": 31}, "hysteresis"),
        ({"id": "x", "type": "threshold", "channel": "temp", "enter": 30, "direction": "up"}, "direction"),
        ({"id": "x", "type": "sequence", "first": {"channel": "temp", "value": 1}, "within_ms": 5}, "missing field 'then'"),
        ({"id": "x", "type": "sequence", "first": {"channel": "temp", "op": "=", "value": 1},
          "then": {"channel": "hum", "value": 1}, "within_ms": 5}, "op"),
        ({"id": "x", "type": "count", "channel": "pot", "value": 1, "count": 1, "within_ms": 5}, "'count' must be in"),
        ({"id": "x", "type": "absence", "channel": "temp", "within_ms": -1}, "'within_ms' must be in"),
        ({"id": "x", "type": "absence", "channel": "temp", "within_ms": 1.5}, "must be an integer"),
        ({"id": "x", "type": "rate", "channel": ["temp", "hum"], "delta": 1, "within_ms": 5}, "one channel"),
        ({"id": "x", "type": "rate", "channel": "temp", "delta": 1e12, "within_ms": 5}, "int32"),
        ({"id": "x", "type": "threshold", "channel": "temp", "enter": 1, "severity": 300}, "severity"),
        ({"id": "bad id!", "type": "threshold", "channel": "temp", "enter": 1}, "id must be"),
        ({"type": "threshold"}, "id"),
    ]
    for d, why in cases:
        e = raises(ConfigError, load_rule, d, CH, Sink())
        assert why in e.reason, (why, e.reason)
        assert e.rule_id == d.get("id", "?")
    e = raises(ConfigError, load_rules, [{"id": "a", "type": "absence", "channel": "temp", "within_ms": 5}] * 2, CH, Sink())
    assert e.reason == "duplicate rule id"
    raises(ConfigError, load_rules, {"id": "a"}, CH, Sink())
    assert load_rules(None, CH, Sink()) == []


def test_threshold_hysteresis_exactly_at_thresholds():
    r, k = _one({"id": "hot", "type": "threshold", "channel": "temp", "enter": 30, "leave": 28, "severity": 3})
    r.sample(0, 30000, 0)  # equal to enter: does not enter
    assert not r.active and k.out == []
    r.sample(0, 30001, 10)
    assert r.active and k.out == [("hot", 10, 0, (30001, 30001, 30001))]
    r.sample(0, 28000, 20)  # equal to leave: stays active
    assert r.active
    r.sample(0, 35000, 30)  # still the same episode: no second match
    assert len(k.out) == 1
    r.sample(0, 27999, 40)
    assert not r.active
    r.sample(0, 29000, 50)  # between leave and enter: does not re-enter
    assert not r.active
    r.sample(0, 31000, 60)
    assert len(k.out) == 2


def test_threshold_below_direction_and_min_duration():
    r, k = _one({"id": "dry", "type": "threshold", "channel": "hum", "direction": "below", "enter": 20, "leave": 25,
                 "min_duration_ms": 5000})
    r.sample(1, 19000, 1000)
    r.sample(1, 18000, 5999)
    assert k.out == []
    r.sample(1, 18500, 6000)  # held exactly min_duration_ms: fires
    assert k.out == [("dry", 6000, 5000, (19000, 18500, 18000))]
    r.sample(1, 17000, 9000)
    assert len(k.out) == 1
    r.sample(1, 25001, 9500)
    r.sample(1, 19000, 10000)
    r.sample(1, 25500, 12000)  # left before min duration: no match
    assert len(k.out) == 1


def _seq():
    return _one({"id": "hot_then_dry", "type": "sequence", "severity": 2,
                 "first": {"channel": "temp", "op": ">", "value": 30},
                 "then": {"channel": "hum", "op": "<", "value": 20}, "within_ms": 10000})


def test_sequence_inclusive_at_exactly_t():
    r, k = _seq()
    r.sample(0, 30500, 1000)
    r.sample(1, 19000, 11000)  # exactly within_ms after A: matches (inclusive)
    assert k.out == [("hot_then_dry", 11000, 10000, (30500, 19000))]
    r.sample(1, 18000, 11500)  # the A was consumed
    assert len(k.out) == 1


def test_sequence_expired_and_order():
    r, k = _seq()
    r.sample(0, 30500, 1000)
    r.sample(1, 19000, 11001)  # one ms too late
    assert k.out == []
    r.sample(1, 19000, 500)  # B before A: no match
    assert k.out == []
    r.sample(0, 31000, 20000)
    r.sample(0, 32000, 25000)  # latest A wins
    r.sample(1, 30000, 26000)  # B condition false
    r.sample(1, 10000, 34000)
    assert k.out == [("hot_then_dry", 34000, 9000, (32000, 10000))]


def test_count_burst_and_wrap_around():
    r, k = _one({"id": "burst", "type": "count", "channel": ["pot", "temp"], "op": ">=", "value": 90,
                 "count": 3, "within_ms": 1000})
    r.sample(2, 95000, 0)
    r.sample(2, 10000, 100)  # not matching
    r.sample(0, 90000, 500)
    r.sample(2, 99000, 1001)  # 3 matches spanning 1001 ms: no
    assert k.out == []
    r.sample(2, 91000, 1500)  # ring wrapped: newest 3 are 500, 1001, 1500
    assert k.out == [("burst", 1500, 1000, (90000, 91000))]
    r.sample(2, 92000, 1600)  # started over
    assert len(k.out) == 1


def test_absence_on_tick_and_rearm():
    r, k = _one({"id": "temp_dead", "type": "absence", "channel": "temp", "within_ms": 5000})
    r.check(0)  # first time seen: the reference
    r.check(5000)  # exactly T of silence: not yet
    assert k.out == []
    r.check(5001)
    assert k.out == [("temp_dead", 5001, 5001, ())]
    r.check(9000)  # once per silence
    assert len(k.out) == 1
    r.sample(0, 21000, 9500)
    r.check(14500)
    r.check(14501)
    assert k.out[1] == ("temp_dead", 14501, 5001, (21000,))


def test_absence_of_matching_samples():
    r, k = _one({"id": "no_heartbeat", "type": "absence", "channel": "pot", "op": ">", "value": 50, "within_ms": 100})
    r.check(0)
    r.sample(2, 10000, 50)  # not matching: does not count as heartbeat
    r.check(101)
    assert len(k.out) == 1 and k.out[0][2] == 101


def test_rate_of_change():
    r, k = _one({"id": "jump", "type": "rate", "channel": "temp", "delta": 2, "within_ms": 1000, "history": 4})
    r.sample(0, 20000, 0)
    r.sample(0, 21000, 500)
    r.sample(0, 22000, 1000)  # |22 - 20| = 2: not above
    assert k.out == []
    r.sample(0, 22500, 1001)  # 20000 @0 is now 1001 ms back: out of T
    assert k.out == []
    r.sample(0, 23001, 1500)  # vs 21000 @500 (exactly T back): 2.001 > 2
    assert k.out == [("jump", 1500, 1000, (21000, 23001))]
    r.sample(0, 23002, 1600)  # history started over: no repeat
    assert len(k.out) == 1


def test_rate_history_wraps():
    r, k = _one({"id": "drop", "type": "rate", "channel": "temp", "delta": 5, "within_ms": 100000, "history": 3})
    for i in range(10):
        r.sample(0, 20100 - i, i * 10)  # older samples are further from the drop
    assert k.out == []
    r.sample(0, 14000, 200)  # compared against the 3 newest only
    assert k.out == [("drop", 200, 130, (20093, 14000))]


def test_shift_moves_rule_times():
    r, k = _seq()
    r.sample(0, 31000, 100000)
    r.shift(90000)
    r.sample(1, 10000, 15000)
    assert k.out == [("hot_then_dry", 15000, 5000, (31000, 10000))]
