# Anomaly detectors: rolling z-score and EWMA, warm-up, cooldown, stuck signals, config.
from shared import wire
from firmware.anomaly import ZScore, Ewma, load_anomaly
from firmware.cep import ConfigError
from tests.logic.util import raises

CH = {"temp": 0, "hum": 1, "pot": 2}


class Sink:
    def __init__(self):
        self.out = []

    def on_anomaly(self, det, t, body):
        self.out.append((t,) + tuple(body))


_R = []
_x = 1
for _i in range(1000):  # ZX81 LCG: deterministic, small ints on both runtimes
    _x = (_x * 75 + 74) % 65537
    _R.append(_x)


def _noise(i, amp):
    # deterministic pseudo-noise in [-amp, amp]
    return _R[i % 1000] % (2 * amp + 1) - amp


def test_zscore_detects_spike_after_warmup():
    k = Sink()
    z = ZScore(0, k, window=32, k16=144, warmup=32, cooldown_ms=10000)
    for i in range(200):
        z.sample(21000 + _noise(i, 300), i * 1000)
    assert k.out == []
    z.sample(25000, 200000)
    assert len(k.out) == 1
    t, ch, det, score, value, base = k.out[0]
    assert (t, ch, det, value) == (200000, 0, wire.DETECTOR_ZSCORE, 25000)
    assert 20700 < base < 21300
    assert score > 3000  # x1000


def test_zscore_score_close_to_float_z():
    k = Sink()
    z = ZScore(0, k, window=16, k16=16, warmup=16)  # k = 1
    vals = [1000 + _noise(i, 50) for i in range(16)]
    for i, v in enumerate(vals):
        z.sample(v, i)
    z.sample(1200, 100)
    n = 16
    mean = sum(vals) / n
    sd = (sum((v - mean) ** 2 for v in vals) / n) ** 0.5
    zf = (1200 - mean) / sd
    score = k.out[0][3]
    assert abs(score / 1000.0 - zf) < 0.02 * zf, (score, zf)


def test_zscore_warmup_suppresses_early_alerts():
    k = Sink()
    z = ZScore(0, k, window=8, warmup=8)
    for i in range(8):
        z.sample(100000 * (i % 2), i)  # wild, but still warming up
    assert k.out == []


def test_cooldown_and_stuck_signal_no_storm():
    k = Sink()
    z = ZScore(1, k, window=32, warmup=32, cooldown_ms=60000, min_std=50)
    t = 0
    for i in range(100):  # perfectly stuck signal
        z.sample(50000, t)
        t += 1000
    assert k.out == []
    for i in range(100):  # steps to a new stuck level: one alert, then the cooldown
        z.sample(60000, t)
        t += 1000
    assert len(k.out) == 1 and z.suppressed > 0
    assert z.suppressed < 40  # the ring absorbs the new level
    for i in range(100):
        z.sample(60000 + (i % 2) * 10, t)  # tiny steps under min_std: never alerts
        t += 1000
    assert len(k.out) == 1


def test_alert_again_after_cooldown():
    k = Sink()
    z = ZScore(0, k, window=16, warmup=16, cooldown_ms=5000)
    t = 0
    for r in range(3):
        for i in range(60):  # 6 s between spikes > cooldown
            z.sample(1000 + _noise(i, 20), t)
            t += 100
        z.sample(5000, t)
        z.sample(5000, t + 50)  # within cooldown: suppressed
        t += 100
    assert len(k.out) == 3
    assert z.suppressed >= 3


def test_zscore_large_values_renormalise_exactly():
    k = Sink()
    z = ZScore(2, k, window=32, warmup=32)
    base = 101325000  # 101325 Pa in fixed point: far from 0, near no small-int edge
    for i in range(300):
        z.sample(base + _noise(i, 2000) + i * 10, i)  # drifting
    assert k.out == []
    assert z.renorms > 0
    z.sample(base + 3000 + 200000, 400)
    assert len(k.out) == 1
    assert abs(k.out[0][5] - (base + 3000 - 160)) < 3000


def test_ewma_detects_and_tracks():
    k = Sink()
    e = Ewma(0, k, alpha_shift=4, k16=96, warmup=16, cooldown_ms=1000)
    for i in range(300):
        e.sample(21000 + _noise(i, 100), i * 100)
    assert k.out == []
    assert abs(e.m - 21000) < 40
    e.sample(23000, 30000)
    assert len(k.out) == 1
    t, ch, det, score, value, base = k.out[0]
    assert det == wire.DETECTOR_EWMA and value == 23000 and abs(base - 21000) < 40
    assert score > 6000


def test_ewma_stuck_signal_and_level_shift():
    k = Sink()
    e = Ewma(0, k, warmup=4, cooldown_ms=100000, min_dev=100)
    for i in range(200):
        e.sample(7000, i)
    assert k.out == []
    for i in range(200):
        e.sample(9000, 200 + i)
    assert len(k.out) == 1 and e.suppressed > 0


def test_load_anomaly_config():
    k = Sink()
    ds = load_anomaly({"zscore": {"channels": ["temp", "hum"], "window": 16, "k": 2.5, "min_std": 0.05},
                       "ewma": {"channels": "pot", "k": 5, "alpha_shift": 3}}, CH, k)
    assert len(ds) == 3
    assert ds[0].ch == 0 and ds[0].cap == 16 and ds[0].k16 == 100 and ds[0].min_std == 50
    assert ds[2].ch == 2 and ds[2].k16 == 80 and ds[2].a == 3
    assert load_anomaly(None, CH, k) == []
    for cfg, rid in (({"iforest": {}}, "anomaly.iforest"),
                     ({"zscore": {"channels": "temp", "window": 64}}, "anomaly.zscore"),
                     ({"zscore": {"channels": "wind"}}, "anomaly.zscore"),
                     ({"zscore": {"window": 8}}, "anomaly.zscore"),
                     ({"ewma": {"channels": "temp", "k": 0}}, "anomaly.ewma"),
                     ({"ewma": {"channels": "temp", "min_dev": 0}}, "anomaly.ewma"),
                     ([], "anomaly")):
        e = raises(ConfigError, load_anomaly, cfg, CH, k)
        assert e.rule_id == rid, (cfg, e.rule_id)


def test_zscore_saturated_outlier_still_alerts_at_k4():
    k = Sink()
    z = ZScore(0, k, window=32, k16=256, warmup=32)  # k = 4
    for i in range(64):
        z.sample(-255000 if i % 2 else 255000, i)  # widest spread the ring allows
    z.sample(2000000000, 100)  # far beyond: clamped, yet still |z| >= 4
    assert len(k.out) == 1 and k.out[0][3] >= 4000
