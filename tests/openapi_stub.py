"""What the strict API stand-ins share (tests/grafana_stub.py, tests/influx2_stub.py).

Both answer on a free loopback port, route each request to an operation of a published API
description (Swagger 2.0 for Grafana, OpenAPI 3.0 for InfluxDB 2.x), reject what it does not
describe, and look for JSON keys its schemas do not define: the published schemas allow unknown
keys and the real servers silently ignore them, which hides client bugs.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import jsonschema

JSON = dict[str, Any]


class RequestRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    operation: JSON


def path_pattern(template: str) -> re.Pattern[str]:
    """The regular expression of a described path: each ``{placeholder}`` is one path segment."""
    return re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")


def first_error(errors: Iterable[jsonschema.ValidationError]) -> jsonschema.ValidationError | None:
    """The validation error nearest the root (sorted by path), or None."""
    return min(errors, key=lambda e: list(e.path), default=None)


class UndefinedKeys:
    """Keys of a JSON value that its schema does not define, where the schema is closed.

    A schema is closed unless it says ``additionalProperties`` (a free-form map); subclasses say
    how a ``$ref`` resolves and, if they need to, how an object schema's properties are gathered.
    """

    def _deref(self, schema: JSON) -> JSON:
        raise NotImplementedError

    def _properties(self, schema: JSON) -> tuple[dict[str, JSON], bool] | None:
        """(properties, closed) of an object schema; None when it is not one."""
        schema = self._deref(schema)
        if "properties" not in schema:
            return None
        return schema["properties"], schema.get("additionalProperties") in (None, False)

    def unknown_keys(self, schema: JSON, value: Any, where: str = "body") -> list[str]:
        schema = self._deref(schema)
        out: list[str] = []
        described = self._properties(schema)
        if isinstance(value, dict) and described is not None:
            props, closed = described
            for key, item in value.items():
                if key in props:
                    out += self.unknown_keys(props[key], item, f"{where}.{key}")
                elif closed:
                    out.append(f"{where}.{key}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                out += self.unknown_keys(schema["items"], item, f"{where}[{i}]")
        return out


class JsonApiServer:
    """A threaded HTTP server on a free loopback port that hands every request to `handle`.

    ``handle`` returns (status, JSON payload); a None payload is sent as an empty body. ``requests``
    and ``rejected`` are for the subclasses' records, ``_lock`` guards their state.
    """

    protocol_version = "HTTP/1.0"
    content_type = "application/json"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, path template)
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> tuple[int, Any]:
        raise NotImplementedError

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = stub.protocol_version

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload = stub.handle(self.command, self.path, dict(self.headers), raw)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", stub.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        return Handler
