#!/usr/bin/env node
// Builds a Sluice policy written in JavaScript into a WebAssembly component.
//
//   node sdk/js/componentize.mjs <policy.js> <world> <out.wasm>
//
// <world> is a world of `sluice:policy` (wit/policy.wit): request-policy,
// filter, rewrite-policy, guard, balancer or tracking-balancer. The WIT is read from ../../wit,
// next to this script, so the component always matches the gateway's ABI.
//
// This calls componentize() from @bytecodealliance/componentize-js directly:
// `jco componentize` (jco 1.35) fails with "failed to get path metadata".

import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const WIT_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'wit');
const WORLDS = ['request-policy', 'filter', 'rewrite-policy', 'guard', 'balancer', 'tracking-balancer'];
const USAGE = `usage: node componentize.mjs <policy.js> <world> <out.wasm>
  <world>: one of ${WORLDS.join(', ')} (from ${WIT_DIR})`;

function fail(message) {
  console.error(`componentize: ${message}`);
  process.exit(1);
}

const args = process.argv.slice(2);
if (args.includes('-h') || args.includes('--help')) {
  console.log(USAGE);
  process.exit(0);
}
if (args.length !== 3) {
  fail(`expected 3 arguments, got ${args.length}\n${USAGE}`);
}
const [source, world, out] = args;
const sourcePath = resolve(source);
const outPath = resolve(out);

if (!existsSync(sourcePath) || !statSync(sourcePath).isFile()) {
  fail(`policy source "${source}" is not a file`);
}
if (!WORLDS.includes(world)) {
  fail(`unknown world "${world}": expected one of ${WORLDS.join(', ')}`);
}
if (!existsSync(join(WIT_DIR, 'policy.wit'))) {
  fail(`WIT not found at ${WIT_DIR}/policy.wit (run this script from a Sluice checkout)`);
}

let componentize;
try {
  ({ componentize } = await import('@bytecodealliance/componentize-js'));
} catch (e) {
  fail(
    `@bytecodealliance/componentize-js is not installed (${e.message}); ` +
      `run: npm ci --prefix ${dirname(fileURLToPath(import.meta.url))}`,
  );
}

// componentize-js reports only "failed to parse JS source"; Node's own syntax
// check says where.
function syntaxError() {
  const check = spawnSync(process.execPath, ['--input-type=module', '--check'], {
    input: readFileSync(sourcePath),
    encoding: 'utf8',
  });
  if (check.status === 0) return '';
  const lines = check.stderr.split('\n');
  const end = lines.findIndex((line) => /^\w*Error:/.test(line));
  return `\n${lines.slice(0, end + 1).join('\n').replaceAll('[stdin]', source)}`;
}

const started = Date.now();
let component;
try {
  ({ component } = await componentize({
    sourcePath,
    witPath: WIT_DIR,
    worldName: world,
    // Without these the component would import wasi:http, which the gateway
    // does not provide.
    disableFeatures: ['http', 'fetch-event'],
  }));
} catch (e) {
  fail(`building ${source} for world "${world}" failed:\n${e?.message ?? e}${syntaxError()}`);
}

// Write next to the target, then rename, so a reader never sees half a file.
const tmpPath = join(dirname(outPath), `.${basename(outPath)}.${process.pid}.tmp`);
try {
  await writeFile(tmpPath, component);
  await rename(tmpPath, outPath);
} catch (e) {
  await rm(tmpPath, { force: true });
  fail(`cannot write ${out}: ${e.message}`);
}
const mib = (component.length / (1024 * 1024)).toFixed(1);
console.error(`componentize: wrote ${out} (${mib} MiB, world ${world}) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
