"""A minimal Sluice request policy in Python: copy this file and edit it.

It refuses requests without an `x-api-key` header (401) and allows each
client `limit` requests a minute (429 beyond). Config: `{"limit": 100}`.

Build (from a Sluice checkout):
    componentize-py -d wit -w sluice:policy/request-policy componentize \
        -p sdk/python/template app -o policy.wasm
"""

import json

# `Err` carries the error of a WIT `result`: raise it to return one.
from componentize_py_types import Err

# The bindings componentize-py generates for the world (`wit_world`): base
# classes to export, and the host's imports.
from wit_world import exports
from wit_world.imports import log, metrics, state
from wit_world.imports.types import Action, Action_Continue, Action_Respond, Reply, Request

# Configuration parsed by `init`. Every instance runs the same `init`, so
# keeping it in a global is safe. Anything that must outlive one call (counts,
# windows) belongs in `state`: instances are pooled and interchangeable.
limit = 100


class Configure(exports.Configure):
    """Exports `sluice:policy/configure`: runs once per instance."""

    def init(self, config: str) -> None:
        global limit
        try:
            settings = json.loads(config)
        except ValueError as e:
            # `raise Err(message)` refuses the plugin with that message. Any
            # other exception traps the instance instead of explaining why.
            raise Err(f"config is not JSON: {e}")
        if not isinstance(settings, dict):
            raise Err("config must be a JSON object")
        for key, value in settings.items():
            if key != "limit":
                raise Err(f'unknown config key "{key}" (expected "limit")')
            # bool is an int in Python: refuse `true` explicitly.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Err('config key "limit" must be a positive integer')
            limit = value
        log.write(log.Level.DEBUG, f"limit = {limit}")


class RequestHook(exports.RequestHook):
    """Exports `sluice:policy/request-hook`: runs for each request."""

    def on_request(self, req: Request) -> Action:
        # `req` is borrowed for this call only: read what you need, do not
        # keep it. `header` returns None when the header is absent.
        if req.header("x-api-key") is None:
            # A metric, exported by the gateway with a `plugin` label.
            metrics.counter_add("missing_key", 1)
            # Answer now: later policies and the upstream are skipped.
            return Action_Respond(
                Reply(
                    status=401,
                    headers=[("content-type", "text/plain")],
                    body=b"missing x-api-key\n",
                )
            )

        # A host-side counter shared by every instance: one per client, reset
        # 60 s after its first hit.
        hits = state.counter_add(f"hits:{req.client_ip()}", 1, 60_000)
        if hits > limit:
            return Action_Respond(
                Reply(status=429, headers=[("retry-after", "60")], body=b"slow down\n")
            )

        # Go on: the next policy, then the upstream.
        return Action_Continue()
