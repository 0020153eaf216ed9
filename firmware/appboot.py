# App set-up (boot only): firmware.app.App's __init__ and _boot, and build() for the board.
# firmware.app.build() unloads this module after boot; nothing may keep a function or class of
# it (that would keep all of its globals: RAM, docs/firmware.md). No module-level state.
from firmware import hal as _hal


def init(app, config, hal, fw):
    """App.__init__: validate the config (firmware.config), set the initial state."""
    from firmware import config as _config  # boot only: build() unloads it (RAM)
    app.cfg = _config.load(config)
    app.hal = hal
    app.fw = fw
    app.running = False
    app.killed = False
    app.boot = None
    app.outbox = None
    app.clock = None
    app.uplink = None
    app.pipeline = None
    app._tasks = []
    app._pbase = 0  # boot ms at the pipeline's t_rel == 0
    app._phi = 0  # ... as the clock's (ms_hi, ms_lo): t_rel from small ints only
    app._plo = 0
    app._chans = _config.channel_map(app.cfg)  # (name, wire channel); boot(): (HAL channel id, wire channel)
    app._raw = True
    app._every = 1
    app._n = 0  # sampling rounds mod raw.every
    app._psynced = False
    app._pepoch = None
    app._beat = {}  # task name -> boot ms of its last progress (watchdog feeding)
    app._fails = {}  # task name -> [failures in the current minute, minute start]
    app.c = {"samples": 0, "missing": 0, "sensor_errors": 0, "task_errors": 0, "readings": 0, "records": 0,
             "windows": 0, "cep": 0, "anomalies": 0, "status": 0, "refused": 0, "ntp_ok": 0, "ntp_fail": 0,
             "errors": 0}


def boot(app):
    """App._boot: boot counter, outbox load, clock, pipeline, uplink."""
    from firmware.identity import Identity
    from firmware.outbox import Outbox
    from firmware.obload import highest_boot
    from firmware.clock import Clock
    from firmware.uplink import Uplink
    cfg = app.cfg
    hal = app.hal
    fs = hal.fs
    ident = Identity(fs, floor=highest_boot(fs, cfg["outbox"]["dir"]))  # not kept: boot only (RAM)
    app.boot = ident.boot
    ob = cfg["outbox"]
    app.outbox = Outbox(fs, app.boot, ob["dir"], ob["max_bytes"], ob["segment_bytes"], ob["batch_records"],
                        ob["batch_ms"], ob["ack_persist_ms"]).load()
    c = cfg["clock"]
    app.clock = Clock(hal, app.boot, c["max_step_ms"], c["use_beacon"])
    app.outbox.stamp = app.clock.stamp_now
    app.pipeline = app._make_pipeline()
    app._pbase = app.clock.boot_ms()
    app._phi = app.clock.ms_hi
    app._plo = app.clock.ms_lo
    app._sync_pipeline()
    app._chans = [(_hal.CHANNELS[nm], num) for nm, num in app._chans]
    app._raw = cfg["raw"]["send"]
    app._every = cfg["raw"]["every"]
    app._n = 0
    hal.use_tls(cfg["broker"].get("tls"))
    app.uplink = Uplink(cfg, hal, app.outbox, app.clock, app.fw, instance=ident.instance)
    hal.console("edgeflow boot device=%s boot=%d fw=%s" % (cfg["device_id"], app.boot, app.fw))
    if app.outbox.torn:
        hal.console("outbox: %d torn segment tail(s) skipped" % app.outbox.torn)


def build(config_path):
    """firmware.app.build: read and validate config.json, build the ESP32 HAL, boot the App
    (boot counter, outbox load). Returns the App, or None (reason printed)."""
    from firmware.app import App, unload
    try:
        with open(config_path) as f:
            text = f.read()
    except OSError as e:
        print("edgeflow: cannot read %s (%r): deploy a config with tools/deploy.py" % (config_path, e))
        return None
    from firmware import config as _config
    try:
        cfg = _config.load(text)
    except _config.ConfigError as e:
        print("edgeflow: CONFIG ERROR %s" % e)
        return None
    text = _config = None
    from firmware.hal_esp32 import Esp32Hal
    hal = Esp32Hal(cfg)
    app = App(cfg, hal)
    unload("firmware.config")  # the validator is needed at boot only
    app._boot()
    unload("firmware.pconf")  # pipeline config parsing: boot only
    unload("firmware.prules")
    unload("shared.wire_ctl")
    unload("firmware.identity")  # the boot counter (the outbox keeps firmware/slots.py)
    # keep only the config the running tasks read (the rest went into the objects): RAM
    c = app.cfg
    app.cfg = app.uplink.cfg = {
        "sample_ms": c["sample_ms"], "watchdog_ms": c["watchdog_ms"], "status_every_s": c["status_every_s"],
        "clock": {"ntp_every_s": c["clock"]["ntp_every_s"], "ntp_host": c["clock"]["ntp_host"]},
        "wifi": c["wifi"]}
    return app


def uplink_init(up, cfg, hal, outbox, clock, fw, instance):
    """Uplink.__init__ (firmware/uplink.py)."""
    from shared import auth
    from shared import wire_dev as wire
    from firmware.mqtt import MQTTClient
    from firmware.backoff import Backoff
    import asyncio
    up.cfg = cfg
    up.hal = hal
    up.outbox = outbox
    up.clock = clock
    up.fw = fw
    up.dev = cfg["device_id"]
    up.devb = up.dev.encode()
    k = cfg.get("ack_key")
    up.key = auth.Hmac(auth.parse_key(k)) if k else None  # None only with "insecure": true
    up.instance = instance
    up.nonce = up.prev_nonce = 0  # 0: no hello yet (a nonce is never 0)
    up._beacon = None  # gw_time of the last accepted time beacon
    from shared import wire_ctl  # boot and hello only: unloaded by build() and Uplink.hello (RAM)
    tp = wire_ctl.Topics(cfg["prefix"])  # not kept: its class would keep wire_ctl loaded
    up.t_ack = tp.ack(up.dev)
    up.t_data = tp.data(up.dev)
    up.t_hello = tp.hello(up.dev)
    up.t_state = tp.state(up.dev)
    up.t_gw = tp.gw_state
    tp = wire_ctl = None
    u = cfg["uplink"]
    up.batch_max = u["batch_max"]
    up.resend_ms = u["resend_ms"]
    up.wifi_timeout_ms = u["wifi_timeout_ms"]  # an attribute: its name is interned once (RAM)
    up.backoff = Backoff(u["backoff_base_ms"], u["backoff_cap_ms"], rng=hal.rand)
    b = cfg["broker"]
    up.client = MQTTClient(
        b["client_id"], b["host"], b["port"], keepalive=b["keepalive_s"],
        will=(up.t_state, wire.encode_state(False), 1, True),
        clean=True, user=b.get("user"), password=b.get("password"),
        open_connection=hal.open_connection, on_message=up._on_message,
        max_inflight=u["max_inflight"], timeout_ms=b["timeout_ms"],
        retransmit=False)  # unacked records are replayed from the outbox after a reconnect
    up.hosts = b["hosts"]  # fail over between these (round robin, same backoff)
    up._hi = 0
    up.running = True
    up.gw_online = False
    up._gw_changed = False
    up.credits = 0
    up.replay = False
    up._acks = []
    up._sent_max = {}
    up._progress = _hal.ticks_ms()
    up._ack_at = up._hello_at = up._progress  # last ack received / last hello sent
    up.wake = asyncio.Event()
    up.session = False
    # counters
    up.c = {"connects": 0, "conn_fails": 0, "reconnects": 0, "wifi_lost": 0,
            "msgs": 0, "sent": 0, "live": 0, "replayed": 0, "acks": 0, "bad_msgs": 0,
            "rewinds": 0, "hellos": 0, "enc_errors": 0, "beacons": 0, "stalls": 0,
            "bad_acks": 0, "old_beacon": 0}
