"""mosquitto configuration for a fleet (tests, the demo and the Raspberry Pi).

Stock limits (max_inflight_messages 20, max_queued_messages 1000) drop QoS 1
messages in bursts to a slower subscriber; a fleet's gateway needs more room.

Security (tools/provision.py writes the files): a TLS-only listener, no anonymous
clients, mosquitto's password file and an ACL of %u patterns, and the user name as
client id so no credential can take another client's id (the gateway's persistent
session included). `security=None` renders the old open listener: only for an explicit
insecure set-up.
"""

TEMPLATE = """\
# edgeflow broker config (tools/brokerconf.py)
listener {port}{bind}
{security}{user_line}{persistence_lines}# Room for a gateway that falls behind during a reconnect storm (pressure is
# held by the broker's queue, not dropped) and for its group commit: it processes up
# to checkpoint.ahead_messages (3,200) while a commit is in flight.
max_inflight_messages 4000
max_queued_messages 200000
max_queued_bytes 0
message_size_limit 262144
max_keepalive 600
set_tcp_nodelay true
"""

PERSISTENCE = """\
persistence {persistence}
persistence_location {data_dir}/
autosave_interval 30
"""

SECURITY = """\
cafile {cafile}
certfile {certfile}
keyfile {keyfile}
tls_version tlsv1.2
allow_anonymous false
password_file {password_file}
acl_file {acl_file}
# the client id is the user name: nobody takes the gateway's (or a device's) client id
use_username_as_clientid true
"""


def render(port=1883, data_dir="/var/lib/mosquitto", bind="127.0.0.1", persistence=True, user=None,
           security=None, conf_d=False):
    """user: run as this user (mosquitto started as root drops to 'mosquitto' otherwise,
    which then cannot write a test's temporary persistence folder).
    security: {cafile, certfile, keyfile, password_file, acl_file} (tools/provision.py).
    conf_d: a snippet for /etc/mosquitto/conf.d (the stock mosquitto.conf sets persistence)."""
    user_line = "user %s\n" % user if user else ""
    sec = SECURITY.format(**security) if security else "allow_anonymous true\n"
    pers = "" if conf_d else PERSISTENCE.format(persistence="true" if persistence else "false",
                                                data_dir=data_dir.rstrip("/"))
    return TEMPLATE.format(port=port, bind=" " + bind if bind else "", security=sec, user_line=user_line,
                           persistence_lines=pers)


if __name__ == "__main__":
    import sys
    sys.stderr.write("brokerconf: this is the open (anonymous, plaintext) listener; a fleet's config with TLS, "
                     "passwords and ACLs comes from edgeflow-provision (docs/security.md)\n")
    print("# INSECURE: anonymous plaintext (edgeflow-provision writes the secure config)")
    print(render(*(sys.argv[1:2] or [1883])), end="")
