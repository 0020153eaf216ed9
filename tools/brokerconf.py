"""mosquitto configuration for a fleet (tests, the demo and the Raspberry Pi).

Stock limits (max_inflight_messages 20, max_queued_messages 1000) drop QoS 1
messages in bursts to a slower subscriber; a fleet's gateway needs more room.
"""

TEMPLATE = """\
# edgeflow broker config (tools/brokerconf.py)
listener {port} {bind}
{user_line}allow_anonymous true
persistence {persistence}
persistence_location {data_dir}/
autosave_interval 30
# Room for a gateway that falls behind during a reconnect storm: pressure is
# held by the broker's queue, not dropped.
max_inflight_messages 1000
max_queued_messages 200000
max_queued_bytes 0
message_size_limit 262144
max_keepalive 600
set_tcp_nodelay true
"""


def render(port=1883, data_dir="/var/lib/mosquitto", bind="127.0.0.1", persistence=True, user=None):
    """user: run as this user (mosquitto started as root drops to 'mosquitto' otherwise,
    which then cannot write a test's temporary persistence folder)."""
    user_line = "user %s\n" % user if user else ""
    return TEMPLATE.format(port=port, bind=bind, data_dir=data_dir.rstrip("/"), user_line=user_line,
                           persistence="true" if persistence else "false")


if __name__ == "__main__":
    import sys
    print(render(*(sys.argv[1:2] or [1883])), end="")
