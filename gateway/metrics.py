"""Prometheus metrics.

The data path bumps plain integer attributes of `Stats` (no locks, no label
lookups per record); a custom collector turns them into metrics at scrape
time, together with gauges read from the live state (queue depth, lag, ...).
"""
import platform
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, ProcessCollector, PlatformCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, \
    InfoMetricFamily, SummaryMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Hist:
    """A histogram on plain numbers (observed on the loop, exported at scrape time)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v, n=1):
        self.counts[bisect_left(self.bounds, v)] += n
        self.sum += v * n
        self.count += n

    def observe_all(self, values):
        """observe(v) for each of a list (one call per commit, not one per message)."""
        counts, bounds = self.counts, self.bounds
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        self.sum += sum(values)
        self.count += len(values)

    def family(self, name, doc):
        acc, buckets = 0, []
        for b, c in zip(self.bounds + (float("inf"),), self.counts):
            acc += c
            buckets.append(("+Inf" if b == float("inf") else repr(b), acc))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


from . import accel  # noqa: E402  (build_info: compiled or pure Python modules)
from .version import version  # noqa: E402,F401 (build_info; the web view shows it)


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
        self.quarantine_pruned = 0  # old quarantine rows deleted to keep its bound
        self.commit_latency = Hist(LATENCY_BUCKETS)  # receipt of a message -> its commit, per message
        self.ack_latency = Hist(LATENCY_BUCKETS)  # receipt of the oldest message an ack covers -> ack sent
        self.checkpoint_hist = Hist(CHECKPOINT_BUCKETS)
        self.checkpoint_failures = 0
        self.last_commit_mono = None  # time.monotonic() of the last successful commit
        self.paused_seconds = 0.0  # ingest paused (queue full), closed intervals
        self.paused_since = None  # monotonic start of the pause in progress
        self.started_mono = time.monotonic()
        self.retention_deleted = {}  # table -> rows deleted by retention

    def quarantine(self, reason):
        self.quarantined[reason] = self.quarantined.get(reason, 0) + 1


class GatewayCollector:
    def __init__(self, gw):
        self.gw = gw

    def most_lagging(self, now):
        """([(lag ms, device)] of the metrics.device_series_max devices with the largest
        watermark lag, sorted by device id; how many devices have a lag). A series for every
        device of a 10,000-device fleet made each scrape 1.4 MB and 0.3-0.4 s of the gateway's
        CPU, holding the GIL the data path needs."""
        wm = self.gw.watermarks
        # the endpoint's thread reads the event loop's dicts: iterate a copy (list() of a dict is one
        # C call under the GIL), or a device added meanwhile fails the scrape
        lags = [(v, dev) for dev in list(wm.devs) for v in (wm.lag(dev, now),) if v is not None]
        n = self.gw.cfg.metrics.device_series_max
        if len(lags) > n:
            lags.sort(reverse=True)  # one C sort: heapq.nlargest re-keyed most of a fleet in lockstep
            top = lags[:n]
        else:
            top = lags
        top.sort(key=lambda x: x[1])
        return top, len(lags)

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
        yield counter("quarantine_pruned", "old quarantine rows deleted (limits.quarantine_max_rows)",
                      s.quarantine_pruned)
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
        yield counter("replay_first_byte_timeouts", "replay slots freed: nothing sent after a grant", adm.first_byte_timeouts)
        yield counter("reflashes", "devices seen with a new flash identity (instance id)", gw.dedup.reflashes)
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
        yield GaugeMetricFamily(p + "replayers_waiting", "devices waiting for a replay slot", value=adm.waiting_count())
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
        yield s.commit_latency.family(p + "commit_latency_seconds",
                                      "receipt of an MQTT message -> the SQLite commit holding its effects")
        yield s.ack_latency.family(p + "ack_latency_seconds",
                                   "receipt of the oldest message an ack covers -> the ack published")
        yield s.checkpoint_hist.family(p + "checkpoint_duration_seconds", "checkpoint transaction duration")
        yield counter("checkpoint_failures", "checkpoint transactions that failed", s.checkpoint_failures)
        paused = s.paused_seconds
        if s.paused_since is not None:
            paused += time.monotonic() - s.paused_since
        yield counter("ingest_paused_seconds", "time the ingest stopped reading the broker (queue full); "
                      "rate() is the share of time under backpressure", paused)
        yield GaugeMetricFamily(p + "uptime_seconds", "seconds since the gateway started",
                                value=time.monotonic() - s.started_mono)
        if s.last_commit_mono is not None:
            yield GaugeMetricFamily(p + "last_commit_age_seconds", "seconds since the last successful commit",
                                    value=time.monotonic() - s.last_commit_mono)
        rd = CounterMetricFamily(p + "retention_deleted_rows", "rows deleted by the retention policy",
                                 labels=["table"])
        for t, n in sorted(s.retention_deleted.items()):
            rd.add_metric([t], n)
        yield rd
        info = InfoMetricFamily(p + "build", "gateway build")
        info.add_metric([], {"version": version(), "python": platform.python_version(),
                             "wire_version": str(_wire_version()), "accel": accel.summary()})
        yield info
        ing = gw.ingest
        yield GaugeMetricFamily(p + "broker_connected", "1 while the MQTT connection is up",
                                value=1 if ing is not None and ing.connected.is_set() else 0)
        online = sum(1 for d in list(gw.devices.devs.values()) if d.online)  # a copy: see most_lagging
        yield GaugeMetricFamily(p + "devices_online", "devices whose last state is online", value=online)
        yield GaugeMetricFamily(p + "devices_known", "devices seen since the database was created",
                                value=len(gw.devices.devs))
        now = int(time.time() * 1000)
        wm = gw.watermarks
        if wm.global_wm is not None:
            yield GaugeMetricFamily(p + "watermark_lag_seconds", "now - global watermark (event time)",
                                    value=(now - wm.global_wm) / 1000.0)
        lags, with_lag = self.most_lagging(now)
        lag_s = GaugeMetricFamily(p + "device_watermark_lag_seconds", "now - device watermark (event time); the "
                                  "metrics.device_series_max most lagging devices", labels=["device"])
        for v, dev in lags:
            lag_s.add_metric([dev], v / 1000.0)
        yield lag_s
        yield GaugeMetricFamily(p + "device_watermark_lag_devices", "devices with a watermark (the per-device lag "
                                "gauges show at most metrics.device_series_max of them)", value=with_lag)
        if wm.global_wm is not None:
            yield GaugeMetricFamily(p + "watermark_lag_ms", "now - global watermark", value=now - wm.global_wm)
        yield GaugeMetricFamily(p + "active_devices", "devices inside the global watermark", value=wm.active_count())
        lag = GaugeMetricFamily(p + "device_watermark_lag_ms", "now - device watermark", labels=["device"])
        for v, dev in lags:
            lag.add_metric([dev], v)
        yield lag
        # downstream sinks: outbox items/bytes/lag, delivered, dropped (gateway/sinks)
        from .sinks import collect_metrics
        yield from collect_metrics(gw)


def _wire_version():
    from shared import wire
    return wire.VERSION


def registry(gw):
    """The gateway's own metrics plus process_* and python_info (prometheus_client's collectors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(gw))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg


def health(gw, max_commit_age_s):
    """(ok, reasons): the broker is connected and a commit succeeded within max_commit_age_s
    (commits run at least every checkpoint.interval_ms while there is work; an idle
    gateway with nothing to commit is healthy)."""
    why = []
    ing = gw.ingest
    if ing is None or not ing.connected.is_set():
        why.append("broker disconnected")
    s = gw.stats
    now = time.monotonic()
    ref = s.last_commit_mono if s.last_commit_mono is not None else s.started_mono
    pending = gw.queue_depth() > 0 or bool(gw.out.mids) or gw.out.records > 0
    if pending and now - ref > max_commit_age_s:
        why.append("no commit for %.0f s with work pending" % (now - ref))
    if s.checkpoint_failures:
        why.append("%d checkpoint failures" % s.checkpoint_failures)
    return not why, why


def serve(gw, host, port):
    """Start the endpoint on its own registry; returns the server (or None when port is 0)."""
    if not port:
        return None
    reg = registry(gw)
    gw.metrics_registry = reg
    out = start_http_server(port, addr=host, registry=reg)
    return out[0] if isinstance(out, tuple) else out
