"""Stamps each response with `x-stamp: python`, unless its config turns that
off: then `init` tells the gateway, with `hooks.skip`, never to call
`on_response` (tests/tests/guests.rs checks both).

Config: `{}` stamps; `{"stamp": false}` skips the response hook.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import hooks
from wit_world.imports.types import Action, Action_Continue, Request, Response


class Configure(exports.Configure):
    def init(self, config: str) -> None:
        try:
            settings = json.loads(config)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        stamp = settings.get("stamp", True) if isinstance(settings, dict) else None
        if not isinstance(stamp, bool):
            raise Err('config must be {} or {"stamp": true|false}')
        if not stamp:
            hooks.skip(hooks.Hook.ON_RESPONSE)


class RequestHook(exports.RequestHook):
    def on_request(self, req: Request) -> Action:
        return Action_Continue()


class ResponseHook(exports.ResponseHook):
    def on_response(self, req: Request, resp: Response) -> None:
        resp.set_header("x-stamp", "python")
