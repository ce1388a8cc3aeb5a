// Stamps each response with `x-stamp: javascript`, unless its config turns
// that off: then `init` tells the gateway, with `skip`, never to call
// `onResponse` (tests/tests/guests.rs checks both).
//
// Config: `{}` stamps; `{"stamp": false}` skips the response hook.

import { skip } from 'sluice:policy/hooks@0.1.0';

export const configure = {
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config);
    } catch (e) {
      throw `config is not JSON: ${e.message}`;
    }
    const stamp = settings === null || typeof settings !== 'object' ? undefined : (settings.stamp ?? true);
    if (typeof stamp !== 'boolean') {
      throw 'config must be {} or {"stamp": true|false}';
    }
    if (!stamp) {
      skip('on-response');
    }
  },
};

export const requestHook = {
  onRequest(_req) {
    return { tag: 'continue' };
  },
};

export const responseHook = {
  onResponse(_req, resp) {
    resp.setHeader('x-stamp', 'javascript');
  },
};
