# The outbox's backlog reader (firmware/outbox.py read_backlog): imported when a replay starts
# and unloaded when it is done, so its code is in RAM only while there is backlog to send
# (docs/firmware.md: RAM).
import binascii

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

_MAGIC = const(0xA5)
_PAYSZ = const(18)
_RFRAME = const(30)
_RESIDUE = const(0x2144DF1C)
_FMAX = const(256)  # no frame is longer (the biggest, a gap record, has 126 bytes)
_DONE = const(0x3FFFFFFF)  # firmware/outbox.py: the cursor's segment once the backlog is read up to L
_NUM = const(0)
_BOOT = const(1)
_FIRST = const(2)
_LAST = const(3)


def read(ob, n):
    """Outbox.read_backlog (n > 0, backlog not done): frames read straight into the result
    (a bytearray); per frame only the CRC check allocates (a memoryview slice). The cursor
    ob._rc: [segment, file offset] to go on from, [boot, seq] where live begins, [boot, seq]
    replayed last."""
    if n > 128:
        n = 128  # "up to n": the result is allocated for n readings
    out = bytearray(n * _RFRAME)  # n readings; a bigger record grows it
    rc = ob._rc
    rseg, roff, Lb, Ls, rb, rs = rc
    cap = len(out)
    mv = memoryview(out)
    w = 0  # out[:w]: the frames handed out
    k = 0
    done = True
    for s in ob.segs:
        num = s[_NUM]
        if num < rseg:
            continue
        b = s[_BOOT]
        if b > Lb or (b == Lb and s[_FIRST] >= Ls):
            break
        if ob.acked.get(b, -1) >= s[_LAST]:
            continue
        try:
            f = ob.fs.open(ob._name(num), "rb")
        except OSError:
            continue
        stop = False
        try:
            off = roff if num == rseg else 0  # file offset of out[r]
            if off:
                f.seek(off)
            r = e = w  # out[r:e]: read, not looked at yet
            while True:
                d = e - r
                fl = 3
                if d >= 3:
                    if out[r] != _MAGIC:
                        break
                    fl = ((out[r + 1] << 8) | out[r + 2]) + 7
                    if fl < _PAYSZ + 7 or fl > _FMAX:
                        break
                if d < fl:  # read more of the file
                    if r > w:  # drop the skipped frames
                        out[w:w + d] = mv[r:e]
                        r = w
                        e = w + d
                    if e == cap:
                        cap += cap + _FMAX
                        nb = bytearray(cap)
                        nb[0:e] = out
                        out = nb
                        mv = memoryview(nb)
                    got = f.readinto(mv[e:])
                    if not got:
                        break  # end of file, or a torn frame
                    e += got
                    continue
                # CRC check without a long int: the CRC-32 of a frame with its (big-endian)
                # CRC bytes reversed is the residue 0x2144DF1C when intact (a small int)
                x = r + fl - 4
                out[x], out[x + 3] = out[x + 3], out[x]
                out[x + 1], out[x + 2] = out[x + 2], out[x + 1]
                ok = binascii.crc32(mv[r:x + 4]) == _RESIDUE
                out[x], out[x + 3] = out[x + 3], out[x]
                out[x + 1], out[x + 2] = out[x + 2], out[x + 1]
                if not ok:
                    break  # torn / corrupt: nothing after it in this file
                b = (out[r + 3] << 24) | (out[r + 4] << 16) | (out[r + 5] << 8) | out[r + 6]
                q = (out[r + 7] << 24) | (out[r + 8] << 16) | (out[r + 9] << 8) | out[r + 10]
                if b > Lb or (b == Lb and q >= Ls):
                    stop = True  # live from here
                    break
                off += fl
                if q <= ob.acked.get(b, -1) or b < rb or (b == rb and q <= rs):
                    r += fl  # acked or sent already
                    continue
                if r > w:
                    out[w:w + d] = mv[r:e]
                    e = w + d
                r = w = w + fl
                k += 1
                rb = b
                rs = q
                if k >= n:
                    break
        finally:
            f.close()
        rc[0] = num
        rc[1] = off
        if stop:
            break
        if k >= n:
            done = False
            break
    if done:
        rc[0] = _DONE
    rc[4] = rb
    rc[5] = rs
    mv = None
    out[w:] = b""  # in place (MicroPython too): no second copy
    return out
