"""The JSON log lines: one field name for the message of every line."""

from __future__ import annotations

import io
import json
import logging

from at_gateway.logs import Redactor, access_log, setup_logging


def test_start_up_and_request_lines_name_their_message_msg() -> None:
    out = io.StringIO()
    root = setup_logging("info", Redactor(["s3cret-value"]), out)
    try:
        logging.getLogger("at_gateway.service").info("listening on %s:%s", "127.0.0.1", 8080)
        access_log(logging.getLogger("at_gateway.access"), {"msg": "request", "status": 200})
        logging.getLogger("at_gateway.service").warning("key s3cret-value refused")
    finally:
        root.handlers.clear()
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [ln["msg"] for ln in lines] == ["listening on 127.0.0.1:8080", "request", "key [REDACTED] refused"]
    assert not [ln for ln in lines if "message" in ln]
    assert [ln["level"] for ln in lines] == ["info", "info", "warning"]
