"""Devices -> P partitions, the same function on the NATS server and in Python.

The NATS servers map every device subject to a partition subject with their own partition
function (a subject mapping, computed where the message enters the cluster):

    edgeflow.d.<id>.data  ->  edgeflow.p.<partition(P, id)>.<id>.data   (likewise hello, state)

NATS computes {{partition(P,1)}} as FNV-1a (32 bit) of the wildcard token's bytes, modulo P:
stable across servers, restarts and versions, and independent of how many gateways run.
`partition_of` is the same function (tests/test_scaleout.py checks it against a real server),
so tools and the merge stage know where a device lives without asking the cluster.
Device acks (edgeflow.d.<id>.ack) and the gateway state are not mapped: they go back to the
devices on their MQTT topics.
"""
LEAVES = ("data", "hello", "state")  # device -> gateway topics (shared/wire.py Topics)
_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def fnv1a32(b):
    h = _FNV_OFFSET
    for x in b:
        h = ((h ^ x) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(device_id, partitions):
    if isinstance(device_id, str):
        device_id = device_id.encode()
    return fnv1a32(device_id) % partitions


def nats_mappings(prefix, partitions):
    """Server config `mappings` that put device subjects on partition subjects."""
    if not 1 <= partitions <= 1024:
        raise ValueError("partitions must be 1..1024 (got %r)" % (partitions,))
    return {"%s.d.*.%s" % (prefix, leaf): "%s.p.{{partition(%d,1)}}.{{wildcard(1)}}.%s" % (prefix, partitions, leaf)
            for leaf in LEAVES}


def stream_subjects(prefix):
    return ["%s.p.*.*.*" % prefix]


def partition_filter(prefix, p):
    return "%s.p.%d.*.*" % (prefix, p)


_SUBJ = {}


def subject_topic(subject):
    """'edgeflow.p.3.dev-1.data' -> b'edgeflow/d/dev-1/data' (the MQTT topic the device used).
    Anything else (not 5 tokens) comes back as it is, for the service to quarantine."""
    t = _SUBJ.get(subject)
    if t is None:
        parts = subject.split(".")
        if len(parts) == 5:
            t = ("%s/d/%s/%s" % (parts[0], parts[3], parts[4])).encode()
        else:
            t = subject.encode()
        if len(_SUBJ) > 100000:  # bounded, like the service's topic cache
            _SUBJ.clear()
        _SUBJ[subject] = t
    return t


def fair_share(partitions, gateways):
    """Partitions one gateway should own when `gateways` are alive (ceil)."""
    return -(-partitions // max(1, gateways))
