// Blocks requests that carry a header: the JavaScript twin of block-rust.
//
// Config: `{}` blocks on `x-block`; `{"header": "x-other"}` picks the header.

import { counterAdd } from 'sluice:policy/metrics@0.1.0';

// Set once by `init`; every instance gets the same config, so a global is safe.
let header = 'x-block';

const BLOCKED = new TextEncoder().encode('blocked\n');

export const configure = {
  // Throw a string to refuse the config (an `Error` object would trap instead).
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config);
    } catch (e) {
      throw `config is not JSON: ${e.message}`;
    }
    if (settings === null || typeof settings !== 'object' || Array.isArray(settings)) {
      throw 'config must be a JSON object';
    }
    for (const [key, value] of Object.entries(settings)) {
      if (key !== 'header') {
        throw `unknown config key "${key}" (expected "header")`;
      }
      if (typeof value !== 'string' || value === '') {
        throw 'config key "header" must be a non-empty string';
      }
      header = value;
    }
  },
};

export const requestHook = {
  onRequest(req) {
    if (req.header(header) === undefined) {
      return { tag: 'continue' };
    }
    counterAdd('blocked', 1n);
    return { tag: 'respond', val: { status: 403, headers: [], body: BLOCKED } };
  },
};
