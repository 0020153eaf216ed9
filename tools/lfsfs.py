"""The HAL's filesystem interface (firmware/hal.py PosixFS: open / rename / remove / listdir /
stat_size / exists / mkdir) over the real littlefs C library (littlefs-python), configured like
MicroPython's ESP32 flash filesystem (extmod/vfs_lfsx.c, VfsLfs2 defaults: read and prog size
32, cache 4 x 32, lookahead 32, block_cycles 100) on the stock 2 MiB "vfs" partition of 4096-byte
blocks. The flash counts every erase per block and the bytes programmed, so tests and
tools/outage_week.py can measure files, blocks in use and wear.

    from tools.lfsfs import LfsFS
    fs = LfsFS()                  # formatted, mounted, empty
    fs.erases_per_block()         # [erases of block 0, ...]
Errors are OSError with MicroPython's errno numbers (ENOENT 2, ENOSPC 28, ...), as the board's
VFS raises them.
"""
import errno

from littlefs import LittleFS, UserContext, lfs
from littlefs.errors import LittleFSError

BLOCK = 4096
BLOCKS = 512  # 2 MiB


class CountingFlash(UserContext):
    """NOR flash in RAM that counts erases per block and programmed bytes."""

    def __init__(self, blocks=BLOCKS, block=BLOCK):
        super().__init__(buffsize=blocks * block)
        self.erases = [0] * blocks
        self.progs = 0
        self.prog_bytes = 0

    def erase(self, cfg, block):
        self.erases[block] += 1
        return super().erase(cfg, block)

    def prog(self, cfg, block, off, data):
        self.progs += 1
        self.prog_bytes += len(data)
        return super().prog(cfg, block, off, data)


def _oserror(e):
    code = -getattr(e, "code", -errno.EIO)
    return OSError(code if code > 0 else errno.EIO, str(e))


class _File:
    def __init__(self, f, fs):
        self.f = f
        self.fs = fs  # the LittleFS: flush() syncs the file like MicroPython's VfsLfs2 does

    def read(self, n=-1):
        try:
            return self.f.read(n)
        except LittleFSError as e:
            raise _oserror(e)

    def readinto(self, b):
        try:
            return self.f.readinto(b)
        except LittleFSError as e:
            raise _oserror(e)

    def write(self, b):
        try:
            return self.f.write(bytes(b))
        except LittleFSError as e:
            raise _oserror(e)

    def seek(self, off, whence=0):
        return self.f.seek(off, whence)

    def tell(self):
        return self.f.tell()

    def flush(self):
        """Like MicroPython's flush on VfsLfs2: the buffered bytes and then lfs_file_sync (the
        file's new size and blocks committed: what a power cut keeps)."""
        try:
            self.f.flush()
            raw = getattr(self.f, "raw", self.f)
            lfs.file_sync(self.fs.fs, raw.fh)
        except LittleFSError as e:
            raise _oserror(e)

    def close(self):
        try:
            self.f.close()
        except LittleFSError as e:
            raise _oserror(e)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class LfsFS:
    def __init__(self, blocks=BLOCKS, block=BLOCK, flash=None):
        self.flash = flash or CountingFlash(blocks, block)
        self.blocks = blocks
        fresh = flash is None
        self.lfs = LittleFS(context=self.flash, block_size=block, block_count=blocks, read_size=32, prog_size=32,
                            cache_size=128, lookahead_size=32, block_cycles=100, mount=False)
        if fresh:
            self.lfs.format()
        self.lfs.mount()

    def remount(self):
        """A reboot: the same flash, mounted again (RAM state of littlefs dropped)."""
        return LfsFS(self.blocks, self.lfs.cfg.block_size, self.flash)

    def _call(self, fn, *a):
        try:
            return fn(*a)
        except LittleFSError as e:
            raise _oserror(e)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, str(a[0]))
        except FileExistsError:
            raise OSError(errno.EEXIST, str(a[0]))

    def open(self, path, mode):
        if "a" in mode and not self.exists(path):
            mode = mode.replace("a", "w")  # littlefs-python's "a" does not create (MicroPython's does)
        try:
            return _File(self._call(self.lfs.open, path, mode), self.lfs)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, path)

    def rename(self, a, b):
        self._call(self.lfs.rename, a, b)

    def remove(self, path):
        self._call(self.lfs.remove, path)

    def listdir(self, path=""):
        return self._call(self.lfs.listdir, path or "/")

    def stat_size(self, path):
        return self._call(self.lfs.stat, path).size

    def exists(self, path):
        try:
            self.lfs.stat(path)
            return True
        except LittleFSError:
            return False

    def mkdir(self, path):
        if not self.exists(path):
            self._call(self.lfs.mkdir, path)

    # ---- measurements
    def used_blocks(self):
        return self.lfs.used_block_count

    def files(self, path="/"):
        n = 0
        for top, dirs, names in self.lfs.walk(path):
            n += len(names)
        return n

    def erases_per_block(self):
        return list(self.flash.erases)
