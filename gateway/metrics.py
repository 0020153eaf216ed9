"""Prometheus metrics.

The data path bumps plain integer attributes of `Stats` (no locks, no label
lookups per record); a custom collector turns them into metrics at scrape
time, together with gauges read from the live state (queue depth, lag, ...).
"""
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily


class Stats:
    def __init__(self):
        self.messages = 0
        self.readings = 0  # new readings (after dedup)
        self.records = 0  # new non-reading records
        self.duplicates = 0
        self.late = 0
        self.quarantined = {}  # reason -> count
        self.unsynced = 0
        self.deferred = 0
        self.dropped_by_device = 0
        self.skipped_by_hello = 0
        self.live = 0
        self.backlog = 0
        self.hellos = 0
        self.offline_wills = 0
        self.acks_sent = 0
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.checkpoint_last_s = 0.0
        self.checkpoint_last_rows = 0
        self.window_results = 0
        self.window_revisions = 0
        self.alerts = 0  # cep + anomaly records
        self.paused = 0  # times the network loop stopped reading (queue full)
        self.queue_max = 0  # deepest the queue got past its bound (one read call can overshoot)
        self.connects = 0
        self.disconnects = 0

    def quarantine(self, reason):
        self.quarantined[reason] = self.quarantined.get(reason, 0) + 1


class GatewayCollector:
    def __init__(self, gw):
        self.gw = gw

    def collect(self):
        gw, s = self.gw, self.gw.stats
        p = "edgeflow_gateway_"

        def counter(name, doc, value):
            return CounterMetricFamily(p + name, doc, value=value)

        yield counter("messages", "MQTT messages processed", s.messages)
        yield counter("readings", "new readings ingested (after dedup)", s.readings)
        yield counter("records", "new non-reading records ingested", s.records)
        yield counter("duplicates", "records dropped as duplicates", s.duplicates)
        yield counter("late", "records beyond the allowed lateness (table late)", s.late)
        q = CounterMetricFamily(p + "quarantined", "rejected input by reason", labels=["reason"])
        for reason, n in sorted(s.quarantined.items()):
            q.add_metric([reason], n)
        yield q
        yield counter("unsynced", "records without an epoch time (table unsynced)", s.unsynced)
        yield counter("deferred", "records beyond the dedup window, left for the device to resend", s.deferred)
        yield counter("dropped_by_device", "seqs the devices reported dropped (gap records)", s.dropped_by_device)
        yield counter("skipped_by_hello", "seqs accounted only by a hello's oldest_seq", s.skipped_by_hello)
        yield counter("live_records", "records of the devices' current session", s.live)
        yield counter("backlog_records", "replayed backlog records", s.backlog)
        yield counter("hellos", "device hellos (connects, rejoin bursts)", s.hellos)
        yield counter("offline_wills", "device offline states (last wills)", s.offline_wills)
        yield counter("acks", "acks published to devices", s.acks_sent)
        yield counter("alerts", "CEP and anomaly records", s.alerts)
        yield counter("window_results", "windows fired (revision 0)", s.window_results)
        yield counter("window_revisions", "late amendments of fired windows", s.window_revisions)
        yield counter("ingest_pauses", "times the network loop stopped reading: queue full", s.paused)
        yield counter("mqtt_connects", "MQTT connections made", s.connects)
        adm = gw.admission
        yield counter("credits_granted", "backlog replay credits granted", adm.credits_granted)
        yield counter("backlog_announced", "backlog records announced in hellos", adm.backlog_announced)
        summ = SummaryMetricFamily(p + "checkpoint_seconds", "checkpoint commit duration",
                                   count_value=s.checkpoints, sum_value=s.checkpoint_seconds)
        yield summ
        yield GaugeMetricFamily(p + "checkpoint_last_seconds", "last checkpoint duration", value=s.checkpoint_last_s)
        yield GaugeMetricFamily(p + "checkpoint_last_rows", "rows written by the last checkpoint",
                                value=s.checkpoint_last_rows)
        yield GaugeMetricFamily(p + "db_bytes", "database + WAL size", value=gw.store.size_bytes())
        yield GaugeMetricFamily(p + "queue_depth", "messages waiting in the ingest queue", value=gw.queue_depth())
        yield GaugeMetricFamily(p + "queue_max", "deepest queue seen at or above its bound", value=s.queue_max)
        yield GaugeMetricFamily(p + "replayers_active", "devices replaying backlog", value=len(adm.active))
        yield GaugeMetricFamily(p + "replayers_waiting", "devices waiting for a replay slot", value=len(adm.waiting))
        yield GaugeMetricFamily(p + "replay_tokens", "token bucket level", value=adm.tokens)
        yield GaugeMetricFamily(p + "replay_rate", "current replay credit rate, records/s (adaptive)",
                                value=adm.rate * 1000.0)
        yield GaugeMetricFamily(p + "replay_credits_outstanding", "backlog credits granted, not yet received",
                                value=adm.outstanding)
        yield GaugeMetricFamily(p + "replay_expected_wait_seconds", "outstanding / committed records/s",
                                value=adm.delay_ms / 1000.0)
        yield GaugeMetricFamily(p + "committed_records_per_second", "EWMA of committed records/s",
                                value=adm.throughput or 0.0)
        yield counter("replay_rate_decreases", "multiplicative decreases of the replay rate", adm.decreases)
        now = int(time.time() * 1000)
        wm = gw.watermarks
        if wm.global_wm is not None:
            yield GaugeMetricFamily(p + "watermark_lag_ms", "now - global watermark", value=now - wm.global_wm)
        yield GaugeMetricFamily(p + "active_devices", "devices inside the global watermark", value=wm.active_count())
        lag = GaugeMetricFamily(p + "device_watermark_lag_ms", "now - device watermark", labels=["device"])
        for dev in sorted(wm.devs):
            v = wm.lag(dev, now)
            if v is not None:
                lag.add_metric([dev], v)
        yield lag
        # downstream sinks: outbox items/bytes/lag, delivered, dropped (gateway/sinks)
        from .sinks import collect_metrics
        yield from collect_metrics(gw)


def serve(gw, host, port):
    """Start the endpoint on its own registry; returns the server (or None when port is 0)."""
    if not port:
        return None
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(gw))
    gw.metrics_registry = reg
    out = start_http_server(port, addr=host, registry=reg)
    return out[0] if isinstance(out, tuple) else out
