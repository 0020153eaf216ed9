# Rarely run App code (firmware/app.py): the pipeline's time base after a clock change or
# every 2**28 ms, the NTP query, the shutdown flush, counters (tests, simulator, selftest), the
# simulated power cut. Imported on demand and unloaded after on MicroPython (RAM).


def sync_pipeline(app):
    """Give the pipeline its base: epoch ms at t_rel 0 when synced, else boot ms."""
    ck = app.clock
    if ck.synced:
        app._psynced = True
        app._pepoch = ck.boot_epoch
        app.pipeline.set_base(ck.boot_epoch + app._pbase, True)
    else:
        app._psynced = False
        app.pipeline.set_base(app._pbase, False)


def rebase(app):
    ck = app.clock
    b = ck.boot_ms()
    app._pbase = b
    app._phi = ck.ms_hi
    app._plo = ck.ms_lo
    app.pipeline.rebase((app._pepoch + b) if app._psynced else b)


def kill(app):
    """Power cut: stop now. Nothing more reaches flash (the RAM batch is lost), the broker
    publishes the last will. Reboot with hal.reboot() and a new App on the same hal."""
    app.killed = True
    app.running = False
    for t in app._tasks:
        try:
            t.cancel()
        except Exception:
            pass
    if app.uplink is not None:
        app.uplink.kill()


def counters(app):
    out = {}
    for k in app.c:
        out[k] = app.c[k]
    if app.uplink is not None:
        for k in app.uplink.c:
            out[k] = app.uplink.c[k]
        out["connected"] = app.uplink.session
        out["gw_online"] = app.uplink.gw_online
    if app.outbox is not None:
        ob = app.outbox
        out["boot"] = app.boot
        out["next_seq"] = ob.seq
        out["stored"] = ob.stored_records()
        out["outbox_bytes"] = ob.total_bytes()
        out["unacked"] = ob.unacked()
        out["dropped"] = ob.dropped
        out["outbox_refused"] = ob.refused
        out["flushes"] = ob.flushes
        out["torn"] = ob.torn
    if app.clock is not None:
        out["synced"] = app.clock.synced
        out["clock_offset_ms"] = app.clock.offset_ms
    return out


def ntp(app):
    """One NTP query (hal.ntp: bounded), counted; the clock takes the answer at the query's midpoint."""
    ck = app.clock
    b0 = ck.boot_ms()
    e = None
    try:
        e = app.hal.ntp(app.cfg["clock"]["ntp_host"])
    except Exception:
        e = None
    if e is None:
        app.c["ntp_fail"] += 1
    else:
        app.c["ntp_ok"] += 1
        ck.set_time(e, "ntp", (b0 + ck.boot_ms()) // 2)


def flush_all(app):
    """Graceful stop: close the windows, flush the outbox, persist the acks."""
    app.pipeline.flush(app.clock.boot_ms() - app._pbase)
    app.outbox.flush()
    app.outbox.persist_acks()
