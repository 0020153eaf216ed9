// edgeflow virtual board: the real MicroPython 1.27 interpreter (npm WebAssembly build) behind a
// loopback TCP port that speaks the MicroPython REPL protocol, so that
//   mpremote connect socket://127.0.0.1:PORT ...
// talks to it like to a board on a serial port. Not hardware: no Wi-Fi, no pins, no real time.
//
// usage: node tools/vboard/server.mjs --dir DIR [--port N] [--fs-limit BYTES] [--run-main]
//                                     [--uid HEX] [--log]
//   --dir       host folder that holds the board's filesystem (mirrored into the interpreter's
//               in-memory VFS at start / soft reset; every change is written back after each
//               executed command: new, changed and deleted files and folders)
//   --port      TCP port on 127.0.0.1 (default 0: a free port). The first line on stdout is
//               the URL to give mpremote: socket://127.0.0.1:N
//   --fs-limit  size of the simulated flash in bytes; writes beyond it fail with ENOSPC (28)
//   --run-main  run /main.py after a soft reset in the friendly REPL, like a board does
//               (off by default: a firmware main loop needs Wi-Fi the virtual board lacks)
//   --uid       machine.unique_id() of the stub, hex (default: derived from --dir)
//
// Protocol (what mpremote uses, see mpremote/transport_serial.py):
//   friendly REPL: line editing, Ctrl-A raw REPL, Ctrl-B banner, Ctrl-C cancel/interrupt,
//                  Ctrl-D soft reset (fresh interpreter), Ctrl-E paste mode
//   raw REPL:      "raw REPL; CTRL-B to exit\r\n>", code ... Ctrl-D -> "OK" out "\x04" err "\x04>",
//                  Ctrl-D on an empty buffer = soft reset, Ctrl-B back to friendly,
//                  Ctrl-E 'A' Ctrl-A (raw-paste request) -> "R\x00" (unsupported: mpremote falls
//                  back to the plain raw REPL)
//   Ctrl-C while code runs: the interpreter cannot be interrupted from outside, so the virtual
//   board discards it and starts a fresh one (like a power cycle; files written by earlier
//   commands are kept, Python state is lost) and reports KeyboardInterrupt.
//
// OSError numbers: Emscripten's errno values (ENOENT 44, EEXIST 20, ...) are translated to the
// Linux / MicroPython numbers (ENOENT 2, EEXIST 17, ...) at the boundary between MicroPython and
// Emscripten's FS, using the ERRNO_CODES table read from the package itself.
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import crypto from "node:crypto";
import { createRequire } from "node:module";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const HOME = path.resolve(HERE, "..", "..");
const BANNER =
  "MicroPython v1.27.0 on 2025-12-09; edgeflow virtual board (MicroPython WebAssembly) with wasm\r\n" +
  'Type "help()" for more information.\r\n';
const RAW_BANNER = "raw REPL; CTRL-B to exit\r\n";
// Folders of Emscripten's own that are not the board's filesystem.
const SYSTEM_DIRS = new Set(["dev", "proc", "tmp", "home", ".vboard"]);
const MAX_INPUT = 4 * 1024 * 1024; // bound on a raw-REPL command / queued input

// Linux (and MicroPython) errno numbers by name.
const LINUX_ERRNO = {
  EPERM: 1, ENOENT: 2, ESRCH: 3, EINTR: 4, EIO: 5, ENXIO: 6, E2BIG: 7, ENOEXEC: 8, EBADF: 9,
  ECHILD: 10, EAGAIN: 11, ENOMEM: 12, EACCES: 13, EFAULT: 14, ENOTBLK: 15, EBUSY: 16, EEXIST: 17,
  EXDEV: 18, ENODEV: 19, ENOTDIR: 20, EISDIR: 21, EINVAL: 22, ENFILE: 23, EMFILE: 24, ENOTTY: 25,
  ETXTBSY: 26, EFBIG: 27, ENOSPC: 28, ESPIPE: 29, EROFS: 30, EMLINK: 31, EPIPE: 32, EDOM: 33,
  ERANGE: 34, EDEADLK: 35, ENAMETOOLONG: 36, ENOLCK: 37, ENOSYS: 38, ENOTEMPTY: 39, ELOOP: 40,
  EOPNOTSUPP: 95, ENOTSUP: 95, EADDRINUSE: 98, ECONNABORTED: 103, ECONNRESET: 104, ENOBUFS: 105,
  EISCONN: 106, ENOTCONN: 107, ETIMEDOUT: 110, ECONNREFUSED: 111, EHOSTUNREACH: 113,
  EALREADY: 114, EINPROGRESS: 115, ECANCELED: 125,
};
// Fallback if the package's table cannot be read (values of Emscripten 3/4).
const EMSCRIPTEN_ERRNO_FALLBACK = {
  EPERM: 63, ENOENT: 44, EINTR: 27, EIO: 29, ENXIO: 60, E2BIG: 1, EBADF: 8, EAGAIN: 6, ENOMEM: 48,
  EACCES: 2, EBUSY: 10, EEXIST: 20, EXDEV: 75, ENODEV: 43, ENOTDIR: 54, EISDIR: 31, EINVAL: 28,
  ENFILE: 41, EMFILE: 33, ENOTTY: 59, EFBIG: 22, ENOSPC: 51, ESPIPE: 70, EROFS: 69, ENOSYS: 52,
  ENOTEMPTY: 55, ENAMETOOLONG: 37, ELOOP: 32,
};

function packagePath() {
  const require = createRequire(path.join(HOME, "package.json"));
  return require.resolve("@micropython/micropython-webassembly-pyscript/micropython.mjs");
}

// Emscripten errno -> Linux errno, read from the package's ERRNO_CODES table.
export function errnoMap(pkgFile) {
  let table = EMSCRIPTEN_ERRNO_FALLBACK;
  try {
    const m = /ERRNO_CODES=\{([^}]*)\}/.exec(fs.readFileSync(pkgFile, "utf8"));
    if (m) {
      table = {};
      for (const kv of m[1].split(",")) {
        const [k, v] = kv.split(":");
        if (k && v !== undefined) table[k.trim()] = parseInt(v, 10);
      }
    }
  } catch (e) { /* fallback */ }
  const map = {};
  for (const [name, em] of Object.entries(table)) {
    if (LINUX_ERRNO[name] !== undefined && map[em] === undefined) map[em] = LINUX_ERRNO[name];
  }
  return map;
}

// ---------------------------------------------------------------------------------------------
// Worker thread: one MicroPython interpreter. Replaced by a fresh worker on every soft reset.
// ---------------------------------------------------------------------------------------------
async function workerMain() {
  const { dir, fsLimit, uid, stubsDir } = workerData;
  const pkg = packagePath();
  const { loadMicroPython } = await import(pkg);
  let outBuf = [];
  const flush = () => {
    if (outBuf.length) {
      parentPort.postMessage({ t: "out", data: Buffer.from(outBuf) });
      outBuf = [];
    }
  };
  const put = (b) => {
    const arr = b instanceof Uint8Array ? b : [b];
    for (const c of arr) {
      outBuf.push(c);
      if (c === 10 || outBuf.length >= 1024) flush();
    }
  };
  const mp = await loadMicroPython({ heapsize: 512 * 1024, linebuffer: false, stdout: put, stderr: put });
  const FS = mp.FS;
  let resetRequested = false;
  let limitActive = false;
  mp.registerJsModule("_vboard", {
    reset: () => { resetRequested = true; },
    uid: () => uid,
    fs_limit: () => fsLimit || 0,
  });

  // --- errno translation at the outermost FS call, and the simulated flash size -------------
  const EMAP = errnoMap(pkg);
  let depth = 0;
  for (const k of Object.keys(FS)) {
    const f = FS[k];
    if (typeof f !== "function" || /^[A-Z]/.test(k) || k === "lookupNode") continue;
    FS[k] = function (...a) {
      depth++;
      try {
        return f.apply(this, a);
      } catch (e) {
        if (depth === 1 && e && e.name === "ErrnoError" && !e._vbTranslated) {
          e._vbTranslated = true;
          if (EMAP[e.errno] !== undefined) e.errno = EMAP[e.errno];
        }
        throw e;
      } finally {
        depth--;
      }
    };
  }
  const isBoardPath = (p) => {
    const top = p.split("/").filter(Boolean)[0];
    return top !== undefined && !SYSTEM_DIRS.has(top);
  };
  const walk = (cb, dirPath = "/") => {
    for (const name of FS.readdir(dirPath)) {
      if (name === "." || name === "..") continue;
      if (dirPath === "/" && SYSTEM_DIRS.has(name)) continue;
      const p = dirPath === "/" ? "/" + name : dirPath + "/" + name;
      const st = FS.stat(p);
      if (FS.isDir(st.mode)) { cb(p, true, st); walk(cb, p); }
      else if (FS.isFile(st.mode)) cb(p, false, st);
    }
  };
  const usedBytes = () => { let n = 0; walk((p, isDir, st) => { n += isDir ? 0 : st.size; }); return n; };
  if (fsLimit) {
    const origWrite = FS.write;
    FS.write = function (stream, buffer, offset, length, position, canOwn) {
      if (limitActive && stream.path && isBoardPath(stream.path)) {
        const cur = stream.node && stream.node.usedBytes !== undefined ? stream.node.usedBytes : 0;
        const pos = (stream.flags & 1024) ? cur : (position !== undefined && position !== null ? position : stream.position);
        const end = Math.max(cur, pos + length);
        if (usedBytes() - cur + end > fsLimit) {
          const e = new FS.ErrnoError(51); // Emscripten's ENOSPC, outside the translating wrapper
          e.errno = EMAP[51] !== undefined ? EMAP[51] : 28;
          e._vbTranslated = true;
          throw e;
        }
      }
      return origWrite.call(this, stream, buffer, offset, length, position, canOwn);
    };
    if (typeof FS.statfs === "function") {
      const origStatfs = FS.statfs;
      FS.statfs = function (p) {
        const r = origStatfs.call(this, p);
        const bs = r.bsize || 4096;
        const total = Math.floor(fsLimit / bs);
        const free = Math.max(0, Math.floor((fsLimit - usedBytes()) / bs));
        return Object.assign({}, r, { bsize: bs, frsize: bs, blocks: total, bfree: free, bavail: free });
      };
    }
  }

  // --- filesystem: host folder -> VFS at start, VFS -> host folder after each command ---------
  for (const d of ["/tmp", "/home/web_user", "/home"]) { try { FS.rmdir(d); } catch (e) { /* keep */ } }
  const known = new Map(); // board path -> Buffer (files) or null (folders), as on the host
  const toHost = (p) => path.join(dir, ...p.split("/").filter(Boolean));
  const mirrorIn = (hostDir, vfsDir) => {
    for (const ent of fs.readdirSync(hostDir, { withFileTypes: true })) {
      const h = path.join(hostDir, ent.name);
      const v = (vfsDir === "/" ? "" : vfsDir) + "/" + ent.name;
      if (vfsDir === "/" && SYSTEM_DIRS.has(ent.name)) continue;
      if (ent.isDirectory()) { FS.mkdir(v); known.set(v, null); mirrorIn(h, v); }
      else if (ent.isFile()) { const data = fs.readFileSync(h); FS.writeFile(v, data); known.set(v, Buffer.from(data)); }
    }
  };
  fs.mkdirSync(dir, { recursive: true });
  mirrorIn(dir, "/");
  const syncOut = () => {
    const now = new Map();
    walk((p, isDir) => { now.set(p, isDir ? null : Buffer.from(FS.readFile(p))); });
    // deletions first (deepest first), then folders, then files
    const gone = [...known.keys()].filter((p) => !now.has(p)).sort((a, b) => b.length - a.length);
    for (const p of gone) {
      try { fs.rmSync(toHost(p), { recursive: true, force: true }); } catch (e) { /* already gone */ }
      known.delete(p);
    }
    for (const [p, data] of now) {
      const old = known.get(p);
      if (data === null) {
        if (old !== null || !known.has(p)) {
          if (old) fs.rmSync(toHost(p), { force: true });
          fs.mkdirSync(toHost(p), { recursive: true });
          known.set(p, null);
        }
      } else if (old === undefined || old === null || !old.equals(data)) {
        if (old === null) fs.rmSync(toHost(p), { recursive: true, force: true });
        fs.mkdirSync(path.dirname(toHost(p)), { recursive: true });
        fs.writeFileSync(toHost(p), data);
        known.set(p, data);
      }
    }
  };

  // --- the virtual board's stub modules (machine, network, dht): not hardware ---------------
  FS.mkdir("/.vboard");
  if (stubsDir && fs.existsSync(stubsDir)) {
    for (const f of fs.readdirSync(stubsDir)) {
      if (f.endsWith(".py")) FS.writeFile("/.vboard/" + f, fs.readFileSync(path.join(stubsDir, f)));
    }
  }
  mp.runPython("import sys\nsys.path.append('/.vboard')\ndel sys\n");
  // Like a board's VFS: os.ilistdir reports file sizes (4-tuples, as LittleFS/FAT do) and the
  // root does not show Emscripten's /dev, /proc or the stub folder.
  mp.runPython(
    "def __vb_patch_os():\n" +
    "    import os\n" +
    "    il = os.ilistdir\n" +
    "    hide = " + JSON.stringify([...SYSTEM_DIRS]).replace(/^\[/, "(").replace(/\]$/, ",)") + "\n" +
    "    def ilistdir(*a):\n" +
    "        p = a[0] if a else os.getcwd()\n" +
    "        if isinstance(p, bytes):\n" +
    "            yield from il(*a)\n" +
    "            return\n" +
    "        full = p if p.startswith('/') else os.getcwd().rstrip('/') + '/' + p\n" +
    "        full = full.rstrip('/.') or '/'\n" +
    "        for e in il(*a):\n" +
    "            if full == '/' and e[0] in hide:\n" +
    "                continue\n" +
    "            size = e[3] if len(e) > 3 else 0\n" +
    "            if e[1] == 0x8000 and not size:\n" +
    "                size = os.stat(full.rstrip('/') + '/' + e[0])[6]\n" +
    "            yield (e[0], e[1], e[2], size)\n" +
    "    def listdir(*a):\n" +
    "        return [e[0] for e in ilistdir(*a)]\n" +
    "    os.ilistdir = ilistdir\n" +
    "    os.listdir = listdir\n" +
    "__vb_patch_os()\n" +
    "del __vb_patch_os\n");

  const run = (code, mode) => {
    let err = "";
    resetRequested = false;
    limitActive = true;
    try {
      if (mode === "single") {
        mp.globals.set("__vb_src", code);
        mp.runPython("exec(compile(__vb_src, '<stdin>', 'single'))");
      } else {
        mp.runPython(code);
      }
    } catch (e) {
      if (e && e.name === "PythonError") {
        if (e.type === "SystemExit") resetRequested = resetRequested || false;
        else err = e.message;
      } else {
        err = "Traceback (most recent call last):\nRuntimeError: virtual board: " + String(e && e.message ? e.message : e) + "\n";
      }
    } finally {
      limitActive = false;
    }
    flush();
    try { syncOut(); } catch (e) { err += "virtual board: could not write back to " + dir + ": " + e.message + "\n"; }
    return err;
  };

  parentPort.on("message", (msg) => {
    if (msg.t === "exec") {
      const err = run(msg.code, msg.mode);
      parentPort.postMessage({ t: "done", err, reset: resetRequested });
    } else if (msg.t === "file") {
      // boot.py / main.py: run it if it exists; errors are printed like a board prints them
      let exists = true;
      try { FS.stat(msg.path); } catch (e) { exists = false; }
      let err = "";
      if (exists) err = run(new TextDecoder().decode(FS.readFile(msg.path)), "file");
      parentPort.postMessage({ t: "done", err, reset: resetRequested, exists });
    }
  });
  parentPort.postMessage({ t: "ready" });
}

// ---------------------------------------------------------------------------------------------
// Main thread: TCP server and the REPL protocol.
// ---------------------------------------------------------------------------------------------
function parseArgs(argv) {
  const o = { dir: null, port: 0, fsLimit: 0, runMain: false, uid: null, log: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) { console.error("vboard: " + a + " needs a value"); process.exit(2); }
      return argv[++i];
    };
    if (a === "--dir") o.dir = path.resolve(val());
    else if (a === "--port") o.port = parseInt(val(), 10);
    else if (a === "--fs-limit") o.fsLimit = parseInt(val(), 10);
    else if (a === "--run-main") o.runMain = true;
    else if (a === "--uid") o.uid = val();
    else if (a === "--log") o.log = true;
    else { console.error("vboard: unknown argument " + a + " (usage: server.mjs --dir DIR [--port N] [--fs-limit BYTES] [--run-main] [--uid HEX])"); process.exit(2); }
  }
  if (!o.dir) { console.error("vboard: --dir DIR is required (the host folder holding the board's files)"); process.exit(2); }
  if (!Number.isInteger(o.port) || o.port < 0 || o.port > 65535) { console.error("vboard: bad --port"); process.exit(2); }
  if (!o.uid) o.uid = crypto.createHash("sha256").update(o.dir).digest("hex").slice(0, 12);
  return o;
}

class Board {
  constructor(opts) {
    this.opts = opts;
    this.client = null;
    this.mode = "friendly";
    this.line = "";        // friendly REPL: current line
    this.block = [];       // friendly REPL: lines of a compound statement
    this.paste = null;     // friendly REPL paste mode buffer (string) or null
    this.raw = [];         // raw REPL: command bytes
    this.rawPaste = 0;     // raw-paste request bytes seen (Ctrl-E 'A' Ctrl-A)
    this.queue = [];       // input received while busy
    this.busy = false;
    this.worker = null;
    this.current = null;   // {resolve} of the running exec
    this.lastOut = 0;
  }

  log(...a) { if (this.opts.log) console.error("vboard:", ...a); }

  send(s) {
    const buf = typeof s === "string" ? Buffer.from(s, "latin1") : s;
    if (this.client && !this.client.destroyed) this.client.write(buf);
  }

  // Python output: \n -> \r\n as a board's cooked stdout does.
  sendOut(buf) {
    const out = [];
    for (const c of buf) {
      if (c === 10 && this.lastOut !== 13) out.push(13);
      out.push(c);
      this.lastOut = c;
    }
    this.send(Buffer.from(out));
  }

  async startWorker() {
    const w = new Worker(new URL(import.meta.url), {
      workerData: {
        dir: this.opts.dir, fsLimit: this.opts.fsLimit, uid: this.opts.uid,
        stubsDir: path.join(HERE, "stubs"),
      },
    });
    this.worker = w;
    await new Promise((resolve, reject) => {
      const onMsg = (m) => {
        if (m.t === "ready") { w.off("message", onMsg); resolve(); }
      };
      w.on("message", onMsg);
      w.once("error", reject);
    });
    w.on("message", (m) => {
      if (w !== this.worker) return;
      if (m.t === "out") this.sendOut(m.data);
      else if (m.t === "done" && this.current) { const c = this.current; this.current = null; c.resolve(m); }
    });
    w.on("error", (e) => {
      if (w !== this.worker) return;
      this.log("worker error", e);
      if (this.current) { const c = this.current; this.current = null; c.resolve({ err: "RuntimeError: virtual board crashed: " + e.message + "\n", crashed: true }); }
    });
  }

  async stopWorker() {
    const w = this.worker;
    this.worker = null;
    if (w) await w.terminate();
  }

  request(msg) {
    return new Promise((resolve) => {
      this.current = { resolve };
      this.worker.postMessage(msg);
    });
  }

  // A soft reset: a fresh interpreter with the host folder mirrored in, boot.py (and main.py).
  async softReset(runMain) {
    await this.stopWorker();
    this.send("MPY: soft reboot\r\n");
    await this.startWorker();
    await this.runFile("/boot.py");
    if (runMain && this.opts.runMain) await this.runFile("/main.py");
  }

  async runFile(p) {
    const r = await this.request({ t: "file", path: p });
    if (r.err) this.sendOut(Buffer.from(r.err));
    if (r.reset) await this.softReset(this.mode === "friendly");
  }

  async exec(code, mode) {
    this.lastOut = 0;
    return await this.request({ t: "exec", code, mode });
  }

  // Ctrl-C while code runs: discard the interpreter, start a fresh one.
  async interrupt() {
    if (!this.current) return;
    const c = this.current;
    this.current = null;
    await this.stopWorker();
    await this.startWorker();
    c.resolve({ err: "Traceback (most recent call last):\n  File \"<stdin>\", line 1, in <module>\nKeyboardInterrupt: \n", reset: false });
  }

  feed(data) {
    for (const c of data) {
      if (this.busy) {
        if (c === 3 && this.current) { this.interrupt(); continue; }
        if (this.queue.length < MAX_INPUT) this.queue.push(c);
        continue;
      }
      this.queue.push(c);
    }
    this.pump();
  }

  async pump() {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length) {
        const c = this.queue.shift();
        await (this.mode === "raw" ? this.rawChar(c) : this.friendlyChar(c));
      }
    } catch (e) {
      this.log("error", e);
    } finally {
      this.busy = false;
    }
  }

  async rawChar(c) {
    if (this.rawPaste === 1) { this.rawPaste = c === 0x41 ? 2 : 0; if (this.rawPaste) return; }
    else if (this.rawPaste === 2) {
      this.rawPaste = 0;
      if (c === 0x01) { this.send("R\x00"); return; } // raw-paste understood but not supported
    }
    if (c === 0x05 && this.raw.length === 0) { this.rawPaste = 1; return; }
    if (c === 0x01) { this.raw = []; this.send(RAW_BANNER + ">"); return; }
    if (c === 0x02) { this.raw = []; this.mode = "friendly"; this.send("\r\n" + BANNER + ">>> "); return; }
    if (c === 0x03) { this.raw = []; return; }
    if (c === 0x04) {
      const code = Buffer.from(this.raw).toString("utf8");
      this.raw = [];
      this.send("OK");
      if (!code.length) {
        this.send("\r\n");
        await this.softReset(false);
        this.send(RAW_BANNER + ">");
        return;
      }
      const r = await this.exec(code, "file");
      this.send("\x04");
      if (r.err) this.sendOut(Buffer.from(r.err));
      this.send("\x04>");
      if (r.reset) { await this.softReset(false); this.send(RAW_BANNER + ">"); }
      return;
    }
    if (this.raw.length < MAX_INPUT) this.raw.push(c);
  }

  async friendlyChar(c) {
    if (this.paste !== null) {
      if (c === 0x03) { this.paste = null; this.send("\r\n>>> "); return; }
      if (c === 0x04) {
        const code = this.paste;
        this.paste = null;
        this.send("\r\n");
        await this.runFriendly(code, "file");
        return;
      }
      if (this.paste.length < MAX_INPUT) this.paste += c === 13 ? "\n" : String.fromCharCode(c);
      if (c === 13) this.send("\r\n=== ");
      else if (c !== 10) this.send(Buffer.from([c]));
      return;
    }
    if (c === 0x01) { this.line = ""; this.block = []; this.mode = "raw"; this.raw = []; this.send("\r\n" + RAW_BANNER + ">"); return; }
    if (c === 0x02) { this.line = ""; this.block = []; this.send("\r\n" + BANNER + ">>> "); return; }
    if (c === 0x03) { this.line = ""; this.block = []; this.send("\r\n>>> "); return; }
    if (c === 0x04) {
      if (this.line === "" && this.block.length === 0) {
        this.send("\r\n");
        await this.softReset(true);
        this.send(BANNER + ">>> ");
      }
      return;
    }
    if (c === 0x05) { this.line = ""; this.block = []; this.paste = ""; this.send("\r\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== "); return; }
    if (c === 0x08 || c === 0x7f) {
      if (this.line.length) { this.line = this.line.slice(0, -1); this.send("\b \b"); }
      return;
    }
    if (c === 10) return;
    if (c === 13) {
      this.send("\r\n");
      const line = this.line;
      this.line = "";
      if (this.block.length) {
        if (line.trim() === "") { const code = this.block.join("\n") + "\n"; this.block = []; await this.runFriendly(code, "single"); return; }
        this.block.push(line);
        this.send("... ");
        return;
      }
      if (line.trimEnd().endsWith(":")) { this.block.push(line); this.send("... "); return; }
      if (line.trim() === "") { this.send(">>> "); return; }
      await this.runFriendly(line, "single");
      return;
    }
    if (c >= 0x20 || c === 9) {
      if (this.line.length < 4096) { this.line += String.fromCharCode(c); this.send(Buffer.from([c])); }
    }
  }

  async runFriendly(code, mode) {
    const r = await this.exec(code, mode);
    if (r.err) this.sendOut(Buffer.from(r.err));
    if (r.reset) { await this.softReset(true); this.send(BANNER); }
    this.send(">>> ");
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const board = new Board(opts);
  await board.startWorker();
  await board.runFile("/boot.py");
  if (opts.runMain) await board.runFile("/main.py");
  const server = net.createServer((sock) => {
    if (board.client && !board.client.destroyed) board.client.destroy(); // a new opener takes the port
    board.client = sock;
    sock.setNoDelay(true);
    board.log("client connected");
    sock.on("data", (d) => board.feed(d));
    sock.on("error", () => {});
    sock.on("close", () => { if (board.client === sock) board.client = null; });
  });
  server.on("error", (e) => { console.error("vboard: " + e.message); process.exit(1); });
  server.listen(opts.port, "127.0.0.1", () => {
    const port = server.address().port;
    process.stdout.write("socket://127.0.0.1:" + port + "\n");
  });
  const stop = async () => {
    server.close();
    if (board.client) board.client.destroy();
    await board.stopWorker();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

if (isMainThread) await main();
else await workerMain();
