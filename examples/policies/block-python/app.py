"""Blocks requests that carry a header: the Python twin of block-rust.

Config: `{}` blocks on `x-block`; `{"header": "x-other"}` picks the header.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import metrics
from wit_world.imports.types import Action, Action_Continue, Action_Respond, Reply, Request

# Set once by `init`; every instance gets the same config, so a global is safe.
header = "x-block"


class Configure(exports.Configure):
    def init(self, config: str) -> None:
        global header
        try:
            settings = json.loads(config)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        if not isinstance(settings, dict):
            raise Err("config must be a JSON object")
        for key, value in settings.items():
            if key != "header":
                raise Err(f'unknown config key "{key}" (expected "header")')
            if not isinstance(value, str) or not value:
                raise Err('config key "header" must be a non-empty string')
            header = value


class RequestHook(exports.RequestHook):
    def on_request(self, req: Request) -> Action:
        if req.header(header) is None:
            return Action_Continue()
        metrics.counter_add("blocked", 1)
        return Action_Respond(Reply(status=403, headers=[], body=b"blocked\n"))
