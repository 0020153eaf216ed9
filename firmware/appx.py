# Rarely run App code (firmware/app.py): the pipeline's time base after a clock change or
# every 2**28 ms, the NTP query, the status record's body (once a status period), a failed
# task, the shutdown flush, counters (tests, simulator, selftest), the simulated power cut.
# Imported on demand and unloaded after on MicroPython (RAM).
import sys

_RESET_AFTER = 5  # task failures within a minute before the board is reset


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


def _u32(v):
    if v < 0:
        return 0
    return v if v <= 0xFFFFFFFF else 0xFFFFFFFF


def status_body(app):
    """The status record's body (shared/wire_dev.py: KIND_STATUS)."""
    ob = app.outbox
    return (_u32(app.clock.boot_ms() // 1000), _u32(ob.stored_records()), _u32(ob.total_bytes()),
            _u32(ob.dropped + ob.refused), _u32(getattr(app.pipeline, "late", 0)),
            app.clock.offset_ms, _u32(app.hal.mem_free()), _u32(app.uplink.c["reconnects"]))


def task_failed(app, name, e):
    """App._supervise: a task raised e. Counted and logged; more than _RESET_AFTER failures of
    one task within a minute reset the board (HAL); the uplink restarts with a fresh session."""
    app.c["task_errors"] += 1
    f = app._fails.get(name)
    now = app.clock.boot_ms()
    if f is None or now - f[1] >= 60000:
        f = app._fails[name] = [0, now]
    f[0] += 1
    app.hal.console("edgeflow: task %s failed (%d): %r" % (name, f[0], e))
    try:
        sys.print_exception(e)
    except AttributeError:
        pass
    if f[0] > _RESET_AFTER:
        app.hal.console("edgeflow: task %s keeps failing: reset" % name)
        app.hal.reset()
        f[0] = 0
    if name == "uplink":  # a fresh session after the restart
        app.uplink.session = False
        app.outbox.end_session()
        app.uplink.client.close()
