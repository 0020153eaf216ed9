// Runs a Python script under the real MicroPython (npm WebAssembly build) one step at a time:
// the script is split at lines "#--- NAME", each part is a separate runPython call, and after
// each part a further call collects garbage and prints "RAM NAME <gc.mem_alloc()>" (this build
// collects garbage only at the top level, so what a step keeps is read between calls).
// "#--- NAME wait=MS" lets the JS event loop (which runs this build's asyncio tasks) run MS ms
// after the part.
// usage: node tools/ram_steps.mjs --heap BYTES --fs DIR SCRIPT.py
//   DIR is mirrored into the interpreter's filesystem root (lib/, stubs, config.json).
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const args = process.argv.slice(2);
let heap = 1 << 21;
let root = null;
while (args.length && args[0].startsWith("--")) {
  const flag = args.shift();
  const val = args.shift();
  if (flag === "--heap") heap = parseInt(val, 10);
  else if (flag === "--fs") root = path.resolve(val);
  else { console.error("unknown flag " + flag); process.exit(2); }
}
const script = fs.readFileSync(args[0], "utf8");
const home = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const require = createRequire(path.join(home, "package.json"));
const { loadMicroPython } = await import(require.resolve("@micropython/micropython-webassembly-pyscript/micropython.mjs"));
const mp = await loadMicroPython({
  heapsize: heap,
  stdout: (l) => process.stdout.write(l + "\n"),
  stderr: (l) => process.stderr.write(l + "\n"),
});
function mirror(h, v) {
  mp.FS.mkdirTree(v);
  for (const ent of fs.readdirSync(h, { withFileTypes: true })) {
    const hp = path.join(h, ent.name);
    const vp = (v === "/" ? "" : v) + "/" + ent.name;
    if (ent.isDirectory()) mirror(hp, vp);
    else mp.FS.writeFile(vp, fs.readFileSync(hp));
  }
}
if (root) mirror(root, "/");
mp.runPython("import os\nos.chdir('/')\ndel os\n");
const parts = [];
let cur = { name: "start", code: [] };
for (const line of script.split("\n")) {
  const m = line.match(/^#--- (\S+)(?: wait=(\d+))?/);
  if (m) { parts.push(cur); cur = { name: m[1], wait: parseInt(m[2] || "0", 10), code: [] }; }
  else cur.code.push(line);
}
parts.push(cur);
try {
  for (const p of parts) {
    mp.runPython(p.code.join("\n"));
    // this build runs asyncio tasks from the JS event loop: let them run
    if (p.wait) await new Promise((r) => setTimeout(r, p.wait));
    // two calls: this build's conservative GC still sees a pointer to the last object a
    // call dropped during the next call (it is freed one call later)
    mp.runPython("import gc\ngc.collect()\n");
    mp.runPython(`gc.collect()\nprint("RAM ${p.name}", gc.mem_alloc())\n`);
  }
} catch (e) {
  process.stderr.write(String(e && e.message ? e.message : e) + "\n");
  process.exitCode = 1;
}
// the app's asyncio tasks would keep the JS event loop alive
process.exit(process.exitCode || 0);
