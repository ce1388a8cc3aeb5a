// A minimal Sluice request policy in JavaScript: copy this file and edit it.
//
// It refuses requests without an `x-api-key` header (401) and allows each
// client `limit` requests a minute (429 beyond). Config: `{"limit": 100}`.
//
// Build (from a Sluice checkout, after `npm ci --prefix sdk/js`):
//   node sdk/js/componentize.mjs sdk/js/template/policy.js request-policy policy.wasm

// Host imports: one module per WIT interface, functions in camelCase.
import { write } from 'sluice:policy/log@0.1.0';
import { counterAdd as metricAdd } from 'sluice:policy/metrics@0.1.0';
import { counterAdd } from 'sluice:policy/state@0.1.0';

// Configuration parsed by `init`. Every instance runs the same `init`, so
// keeping it in a module variable is safe. Anything that must outlive one
// call (counts, windows) belongs in `state`: instances are pooled.
let limit = 100;

const text = (s) => new TextEncoder().encode(s);

// Exports `sluice:policy/configure`: runs once per instance. Each exported
// interface is an object named after it in camelCase; methods are called
// without `this`, so do not rely on it.
export const configure = {
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config);
    } catch (e) {
      // Throwing a string refuses the plugin with that message. Throwing an
      // Error object (or letting one escape, like this SyntaxError) traps.
      throw `config is not JSON: ${e.message}`;
    }
    if (settings === null || typeof settings !== 'object' || Array.isArray(settings)) {
      throw 'config must be a JSON object';
    }
    for (const [key, value] of Object.entries(settings)) {
      if (key !== 'limit') {
        throw `unknown config key "${key}" (expected "limit")`;
      }
      if (!Number.isInteger(value) || value < 1) {
        throw 'config key "limit" must be a positive integer';
      }
      limit = value;
    }
    write('debug', `limit = ${limit}`);
  },
};

// Exports `sluice:policy/request-hook`: runs for each request.
export const requestHook = {
  onRequest(req) {
    // `req` is borrowed for this call only: read what you need, do not keep
    // it. `header` returns undefined when the header is absent.
    if (req.header('x-api-key') === undefined) {
      // A metric, exported by the gateway with a `plugin` label. 64-bit
      // integers are BigInt: `1n`.
      metricAdd('missing_key', 1n);
      // Answer now: later policies and the upstream are skipped.
      return {
        tag: 'respond',
        val: {
          status: 401,
          headers: [['content-type', 'text/plain']],
          body: text('missing x-api-key\n'),
        },
      };
    }

    // A host-side counter shared by every instance: one per client, reset
    // 60 s after its first hit. It returns a BigInt.
    const hits = counterAdd(`hits:${req.clientIp()}`, 1n, 60_000n);
    if (hits > BigInt(limit)) {
      return {
        tag: 'respond',
        val: { status: 429, headers: [['retry-after', '60']], body: text('slow down\n') },
      };
    }

    // Go on: the next policy, then the upstream.
    return { tag: 'continue' };
  },
};
