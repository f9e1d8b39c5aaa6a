"""A stand-in InfluxDB 2.x on a free loopback port, strict about every request it gets.

Every request is checked against InfluxData's published OpenAPI descriptions (from
``$FLOWLINE_SCHEMAS_DIR``, see tests/conftest.py's `schema_file`): ``influxdb2-oss-openapi.yml`` for ``/api/v2/...`` and
``influxdb2-v1compat-openapi.yml`` for the 1.x-compatible ``/write`` and ``/query``. The path and
method must be described; every query parameter must be declared (and fit its schema: type, enum),
required ones present; declared headers must hold one of their allowed values; the body's content
type must be one the operation accepts, a JSON body must validate against its schema AND contain no
key the schema does not define (the published schemas allow unknown keys, which hides client bugs);
the credentials must be of a scheme the operation's security allows. The stub's own JSON answers
are validated against the described response schemas too, so a test cannot pass on an answer a
real server would never give.

Behind the contract it keeps orgs, buckets, DBRP mappings and authorizations (tokens with
per-bucket read/write permissions, enforced), and stores through a real InfluxDB 1.x: a bucket
mapped to database ``db`` and retention policy ``rp`` is that database and policy on the backing
server, so writes (v2 and 1.x-compatible) and InfluxQL queries run on a real engine.

One deviation from the descriptions, listed in `NOT_IN_THE_DESCRIPTION` with its source: the
1.x-compatible ``/query`` takes ``epoch`` (InfluxDB 2.x's /query reference documents it; the
OpenAPI file omits it).
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import requests
import yaml

from flowline.lab.services import InfluxDServer
from tests import openapi_stub
from tests.openapi_stub import JSON, JsonApiServer, RequestRejected, UndefinedKeys, first_error, path_pattern

V2_FILE = "influxdb2-oss-openapi.yml"
V1COMPAT_FILE = "influxdb2-v1compat-openapi.yml"
# (path, query parameter) the descriptions omit but InfluxData documents for 2.x; each with its source
NOT_IN_THE_DESCRIPTION = {
    ("/query", "epoch"): "https://docs.influxdata.com/influxdb/v2/reference/api/influxdb-1x/query/ (epoch)",
}


def _any_of(node: Any) -> Any:
    if isinstance(node, dict):
        return {("anyOf" if k == "oneOf" else k): _any_of(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_any_of(v) for v in node]
    return node


@dataclass(frozen=True)
class Route(openapi_stub.Route):
    parameters: tuple[JSON, ...]


@dataclass
class Request:
    route: Route
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, text, or None


class OpenApiContract(UndefinedKeys):
    """Routing and request/response validation from one OpenAPI 3.0 document."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        self.doc: JSON = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        self.prefix = self.doc["servers"][0]["url"].rstrip("/")
        routes = []
        for template, item in self.doc["paths"].items():
            shared = [self._deref(p) for p in item.get("parameters", [])]
            for method, op in item.items():
                if method in ("get", "post", "put", "patch", "delete"):
                    params = tuple(shared + [self._deref(p) for p in op.get("parameters", [])])
                    routes.append(Route(method.upper(), template, path_pattern(template), op, params))
        self.routes = sorted(routes, key=lambda r: r.template.count("{"))  # literal segments first
        self._any_of_components = _any_of(self.doc["components"])

    def _deref(self, node: JSON) -> JSON:
        while "$ref" in node:
            *_, kind, name = node["$ref"].split("/")
            node = self.doc["components"][kind][name]
        return node

    def owns(self, path: str) -> bool:
        rel = path[len(self.prefix) :] if path.startswith(self.prefix) else None
        return rel is not None and any(r.pattern.match(rel) for r in self.routes)

    def route(self, method: str, path: str) -> Route:
        rel = path[len(self.prefix) :] or "/"
        matching = [r for r in self.routes if r.pattern.match(rel)]
        if not matching:
            raise RequestRejected(404, f"{self.name} describes no path {path}")
        for r in matching:
            if r.method == method:
                return r
        raise RequestRejected(405, f"{self.name} does not describe {method} {path}")

    # --- requests --------------------------------------------------------------------------------

    def check(self, method: str, path: str, raw_query: str, headers: dict[str, str], raw_body: bytes) -> Request:
        route = self.route(method, path)
        where = f"{method} {path}"
        query = {k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
        declared = {p["name"]: p for p in route.parameters if p["in"] == "query"}
        for name, value in query.items():
            param = declared.get(name)
            if param is None:
                if (route.template, name) in NOT_IN_THE_DESCRIPTION:
                    continue
                raise RequestRejected(400, f"{where}: query parameter {name!r} is not in {self.name}")
            self._check_value(param.get("schema", {}), value, f"{where}: query parameter {name!r}")
        lower = {k.lower(): v for k, v in headers.items()}
        for param in route.parameters:
            if param.get("required") and param["in"] in ("query", "header"):
                present = param["name"] in query if param["in"] == "query" else param["name"].lower() in lower
                if not present:
                    raise RequestRejected(400, f"{where}: required {param['in']} parameter {param['name']!r} missing")
            if param["in"] == "header" and param["name"].lower() in lower:
                value = lower[param["name"].lower()].split(";")[0].strip()
                self._check_value(param.get("schema", {}), value, f"{where}: header {param['name']}")
        self._check_security(route, where, lower, query)
        body = self._check_body(route, where, lower, raw_body)
        return Request(route, query, lower, body)

    def _check_value(self, schema: JSON, value: str, where: str) -> None:
        schema = self._deref(schema)
        kind = schema.get("type", "string")
        if kind == "integer" and not re.fullmatch(r"-?\d+", value):
            raise RequestRejected(400, f"{where}: {value!r} is not an integer")
        if kind == "boolean" and value not in ("true", "false"):
            raise RequestRejected(400, f"{where}: {value!r} is not true/false")
        if "enum" in schema and value not in [str(e) for e in schema["enum"]]:
            raise RequestRejected(400, f"{where}: {value!r} is not one of {schema['enum']}")

    def _check_security(self, route: Route, where: str, headers: dict[str, str], query: dict[str, str]) -> None:
        requirements = route.operation.get("security", self.doc.get("security", []))
        if not requirements:
            return
        schemes = self.doc["components"]["securitySchemes"]
        authorization = headers.get("authorization", "")
        for requirement in requirements:
            for name in requirement:
                scheme = schemes[name]
                if scheme.get("scheme") == "basic" and authorization.startswith("Basic "):
                    return
                if (
                    scheme.get("in") == "header"
                    and scheme.get("name") == "Authorization"
                    and authorization.startswith("Token ")
                ):
                    return
                if scheme.get("in") == "query" and "u" in query and "p" in query:
                    return
        raise RequestRejected(401, f"{where}: no credentials of a scheme it allows ({requirements})")

    def _check_body(self, route: Route, where: str, headers: dict[str, str], raw: bytes) -> Any:
        spec = self._deref(route.operation.get("requestBody", {}))
        if not spec:
            if raw:
                raise RequestRejected(400, f"{where}: {self.name} describes no request body")
            return None
        if not raw:
            if spec.get("required"):
                raise RequestRejected(400, f"{where}: a request body is required")
            return None
        content_type = headers.get("content-type", "").split(";")[0].strip()
        content = spec.get("content", {})
        if content_type not in content:
            raise RequestRejected(415, f"{where}: content type {content_type!r} is not one of {sorted(content)}")
        if headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        schema = content[content_type].get("schema", {})
        if content_type != "application/json":
            return raw.decode("utf-8")
        body = json.loads(raw)
        self.validate(schema, body, f"{where}: request body")
        return body

    # --- schemas -----------------------------------------------------------------------------------

    def validate(self, schema: JSON, value: Any, where: str, response: bool = False) -> None:
        """JSON Schema validation (OpenAPI 3.0 schemas are a draft-4 dialect) plus no undefined keys.

        For responses, ``oneOf`` is read as ``anyOf``: InfluxQLResponse's alternatives differ only in
        ``required`` keys, so a real server's result with both ``series`` and ``statement_id`` matches two.
        """
        components = self._any_of_components if response else self.doc["components"]
        validator = jsonschema.Draft4Validator({**(_any_of(schema) if response else schema), "components": components})
        error = first_error(validator.iter_errors(value))
        if error is not None:
            raise RequestRejected(400, f"{where}: {error.message[:300]} at {list(error.path)}")
        unknown = self.unknown_keys(schema, value, "body")
        if unknown:
            raise RequestRejected(400, f"{where}: keys {self.name} does not define: {unknown}")

    def _properties(self, schema: JSON) -> tuple[dict[str, JSON], bool] | None:
        """(properties, closed) of an object schema, allOf members merged; None when not an object schema."""
        schema = self._deref(schema)
        props: dict[str, JSON] = dict(schema.get("properties", {}))
        found = "properties" in schema
        for part in schema.get("allOf", []):
            sub = self._properties(part)
            if sub is not None:
                props.update(sub[0])
                found = True
        if not found:
            return None
        return props, schema.get("additionalProperties") in (None, False)

    def response_schema(self, route: Route, status: int) -> JSON | None:
        responses = route.operation["responses"]
        spec = self._deref(responses.get(str(status)) or responses.get("default") or {})
        content = spec.get("content", {}).get("application/json")
        return None if content is None else content.get("schema", {})


@dataclass
class Auth:
    id: str
    token: str
    org_id: str
    permissions: list[JSON]
    description: str = ""

    def allows(self, action: str, bucket_id: str) -> bool:
        return any(
            p["action"] == action
            and p["resource"]["type"] == "buckets"
            and p["resource"].get("id", bucket_id) == bucket_id
            for p in self.permissions
        )


@dataclass
class Influx2State:
    org: JSON
    buckets: dict[str, JSON] = field(default_factory=dict)  # id -> Bucket
    dbrps: dict[str, JSON] = field(default_factory=dict)  # id -> DBRP
    auths: dict[str, Auth] = field(default_factory=dict)  # token -> authorization


class Influx2Stub(JsonApiServer):
    """See the module docstring. ``requests`` lists (method, described path) of every accepted request."""

    protocol_version = "HTTP/1.1"
    content_type = "application/json; charset=utf-8"

    def __init__(
        self,
        v2: OpenApiContract,
        v1: OpenApiContract,
        backing: InfluxDServer,
        admin_token: str,
        org: str = "flowline-org",
    ) -> None:
        self.v2 = v2
        self.v1 = v1
        self.backing = backing
        self._ids = itertools.count(0x0A00000000000001)
        org_id = self._id()
        self.state = Influx2State(org={"id": org_id, "name": org})
        self.admin = Auth(self._id(), admin_token, org_id, [], "operator")
        super().__init__()

    def _id(self) -> str:
        return f"{next(self._ids):016x}"

    # --- dispatch --------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        contract = self.v2 if parts.path.startswith(self.v2.prefix + "/") else self.v1
        try:
            request = contract.check(method, parts.path, parts.query, headers, raw_body)
            with self._lock:
                status, payload = self._apply(contract, request, parts.path)
                self.requests.append((method, contract.prefix + request.route.template))
            schema = contract.response_schema(request.route, status)
            if payload is not None and schema is not None:
                try:
                    contract.validate(schema, payload, f"the stub's own {status} answer", response=True)
                except RequestRejected as exc:
                    raise AssertionError(exc.message) from None
            return status, payload
        except RequestRejected as exc:
            self.rejected.append(f"{method} {parts.path}: {exc.message}")
            return exc.status, {"code": "invalid", "message": exc.message}
        except json.JSONDecodeError as exc:
            self.rejected.append(f"{method} {parts.path}: body is not JSON ({exc})")
            return 400, {"code": "invalid", "message": "bad JSON"}

    def _auth(self, request: Request) -> Auth:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Token ") if header.startswith("Token ") else None
        if header.startswith("Basic "):
            token = base64.b64decode(header[6:]).decode().partition(":")[2]  # 2.x: the password is a token
        elif token is None and "p" in request.query:
            token = request.query["p"]
        if token == self.admin.token:
            return self.admin
        auth = self.state.auths.get(token or "")
        if auth is None:
            raise RequestRejected(401, "unauthorized access")
        return auth

    def _apply(self, contract: OpenApiContract, request: Request, path: str) -> tuple[int, Any]:
        auth = self._auth(request)
        key = (request.route.method, contract.prefix + request.route.template)
        q = request.query
        if key[1] in ("/api/v2/orgs", "/api/v2/buckets", "/api/v2/dbrps", "/api/v2/authorizations") and (
            auth is not self.admin
        ):
            raise RequestRejected(403, "only the operator token manages orgs, buckets, mappings and tokens here")
        if key == ("GET", "/api/v2/orgs"):
            orgs = [self.state.org] if q.get("org", self.state.org["name"]) == self.state.org["name"] else []
            if not orgs:
                return 404, {"code": "not found", "message": f'organization name "{q["org"]}" not found'}
            return 200, {"orgs": orgs}
        if key == ("GET", "/api/v2/buckets"):
            found = [b for b in self.state.buckets.values() if "name" not in q or b["name"] == q["name"]]
            return 200, {"buckets": found}
        if key == ("POST", "/api/v2/buckets"):
            return self._create_bucket(request.body)
        if key == ("GET", "/api/v2/dbrps"):
            found = [
                d for d in self.state.dbrps.values()
                if all(str(d[field_]).lower() == q[param].lower() for param, field_ in
                       (("db", "database"), ("rp", "retention_policy"), ("bucketID", "bucketID"), ("id", "id"))
                       if param in q)
            ]  # fmt: skip
            return 200, {"content": found}
        if key == ("POST", "/api/v2/dbrps"):
            return self._create_dbrp(request.body)
        if key == ("POST", "/api/v2/authorizations"):
            body = request.body
            new = Auth(self._id(), base64.urlsafe_b64encode(os.urandom(48)).decode(), body["orgID"],
                       body["permissions"], body.get("description", ""))  # fmt: skip
            self.state.auths[new.token] = new
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            created = {"id": new.id, "token": new.token, "orgID": new.org_id, "permissions": new.permissions}
            return 201, {**created, "description": new.description, "status": "active", "createdAt": now,
                         "updatedAt": now}  # fmt: skip
        if key == ("POST", "/api/v2/write"):
            wanted = q.get("bucket")
            bucket = next((b for b in self.state.buckets.values() if wanted in (b["name"], b["id"])), None)
            if bucket is None:
                return 404, {"code": "not found", "message": f'bucket "{q.get("bucket")}" not found'}
            return self._write(auth, bucket["id"], request.body, q.get("precision", "ns"))
        if key == ("POST", "/write"):
            dbrp = self._mapping(q["db"], q.get("rp"))
            return self._write(auth, dbrp["bucketID"], request.body, q.get("precision", "ns"))
        if key == ("POST", "/query"):
            return self._query(auth, q)
        return 501, {"code": "not implemented", "message": f"the stub does not implement {key[0]} {key[1]}"}

    # --- behaviour ---------------------------------------------------------------------------------

    def _create_bucket(self, body: JSON) -> tuple[int, Any]:
        if any(b["name"] == body["name"] for b in self.state.buckets.values()):
            return 422, {"code": "conflict", "message": "bucket with name " + body["name"] + " already exists"}
        bucket = {"id": self._id(), "name": body["name"], "orgID": body["orgID"],
                  "retentionRules": body.get("retentionRules", []), "type": "user"}  # fmt: skip
        self.state.buckets[bucket["id"]] = bucket
        return 201, bucket

    def _create_dbrp(self, body: JSON) -> tuple[int, Any]:
        bucket = self.state.buckets.get(body.get("bucketID", ""))
        if bucket is None:
            return 404, None
        db, rp = body["database"], body["retention_policy"]
        if any(d["database"] == db and d["retention_policy"] == rp for d in self.state.dbrps.values()):
            return 400, {"code": "conflict", "message": "another DBRP mapping with same orgID, db, and rp exists"}
        if body.get("default"):
            for other in self.state.dbrps.values():
                if other["database"] == db:
                    other["default"] = False
        dbrp = {"id": self._id(), "orgID": body["orgID"], "bucketID": bucket["id"], "database": db,
                "retention_policy": rp, "default": bool(body.get("default")), "virtual": False}  # fmt: skip
        self.state.dbrps[dbrp["id"]] = dbrp
        seconds = next((r["everySeconds"] for r in bucket["retentionRules"]), 0)
        self.backing.query(f'CREATE DATABASE "{db}"')
        duration = f"{seconds}s" if seconds else "INF"
        default = " DEFAULT" if dbrp["default"] else ""
        self.backing.query(f'CREATE RETENTION POLICY "{rp}" ON "{db}" DURATION {duration} REPLICATION 1{default}')
        return 201, dbrp

    def _mapping(self, db: str, rp: str | None) -> JSON:
        for dbrp in self.state.dbrps.values():
            if dbrp["database"] == db and (dbrp["retention_policy"] == rp if rp else dbrp["default"]):
                return dbrp
        raise RequestRejected(404, f"no DBRP mapping for database {db!r} retention policy {rp or '(default)'}")

    def _write(self, auth: Auth, bucket_id: str, body: str, precision: str) -> tuple[int, Any]:
        if auth is not self.admin and not auth.allows("write", bucket_id):
            return 403, {"code": "forbidden", "message": "insufficient permissions for write"}
        dbrp = next((d for d in self.state.dbrps.values() if d["bucketID"] == bucket_id), None)
        if dbrp is None:
            return 501, {"code": "not implemented", "message": "the stub stores only buckets with a DBRP mapping"}
        response = requests.post(
            f"{self.backing.url}/write",
            params={"db": dbrp["database"], "rp": dbrp["retention_policy"], "precision": precision},
            data=body.encode(), auth=(self.backing.admin.name, self.backing.admin.password), timeout=30,
        )  # fmt: skip
        if response.status_code == 204:
            return 204, None
        return response.status_code, {"code": "invalid", "message": response.json().get("error", response.text)}

    def _query(self, auth: Auth, q: JSON) -> tuple[int, Any]:
        rp = q.get("rp")
        dbrp = self._mapping(q["db"], rp)
        buckets = {d["bucketID"] for d in self.state.dbrps.values() if d["database"] == q["db"]}
        if auth is not self.admin and not any(auth.allows("read", b) for b in buckets):
            return 403, {"code": "forbidden", "message": "insufficient permissions for read"}
        params = {"db": dbrp["database"], "q": q.get("q", "")}
        if rp:
            params["rp"] = rp
        if "epoch" in q:
            params["epoch"] = q["epoch"]
        response = requests.post(
            f"{self.backing.url}/query", params=params,
            auth=(self.backing.admin.name, self.backing.admin.password), timeout=30,
        )  # fmt: skip
        return response.status_code, response.json()
