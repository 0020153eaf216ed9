// Runs Python under the real MicroPython (WebAssembly build from npm) with the
// repo's firmware/, shared/ and tests/logic/ mirrored into its in-memory /lib.
// usage: node tests/mp/run.mjs [--heap BYTES] [--root DIR] [--dirs a,b,c] SCRIPT.py [ARGS...]
// Exit code: 0 if the script ran to the end, 1 if it raised (traceback on stderr).
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const args = process.argv.slice(2);
let heap = 2 * 1024 * 1024;
const home = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "..");
let root = home;
let dirs = ["firmware", "shared", "tests"];
while (args.length && args[0].startsWith("--")) {
  const flag = args.shift();
  const val = args.shift();
  if (flag === "--heap") heap = parseInt(val, 10);
  else if (flag === "--root") root = path.resolve(val);
  else if (flag === "--dirs") dirs = val.split(",").filter(Boolean);
  else { console.error("unknown flag " + flag); process.exit(2); }
}
if (!args.length) { console.error("usage: run.mjs [--heap N] [--root DIR] [--dirs a,b] SCRIPT.py [ARGS]"); process.exit(2); }
const script = path.resolve(args.shift());

const require = createRequire(path.join(home, "package.json"));
const pkg = require.resolve("@micropython/micropython-webassembly-pyscript/micropython.mjs");
const { loadMicroPython } = await import(pkg);

const mp = await loadMicroPython({
  heapsize: heap,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});

function mirror(hostDir, vfsDir) {
  mp.FS.mkdirTree(vfsDir);
  for (const ent of fs.readdirSync(hostDir, { withFileTypes: true })) {
    if (ent.name === "__pycache__" || ent.name.startsWith(".")) continue;
    const h = path.join(hostDir, ent.name);
    const v = vfsDir + "/" + ent.name;
    if (ent.isDirectory()) mirror(h, v);
    else if (ent.name.endsWith(".py") || ent.name.endsWith(".json")) mp.FS.writeFile(v, fs.readFileSync(h));
  }
}
for (const d of dirs) {
  const h = path.join(root, d);
  if (fs.existsSync(h)) mirror(h, "/lib/" + d);
}

const argv = JSON.stringify([script, ...args]);
try {
  mp.runPython(`import sys\nsys.path.insert(0, "/lib")\nsys.argv[:] = ${argv}\n`);
  mp.runPython(fs.readFileSync(script, "utf8"));
} catch (e) {
  process.stderr.write(String(e && e.message ? e.message : e) + "\n");
  process.exitCode = 1;
}
