"""A stand-in Grafana HTTP API on a free loopback port, strict about every request it gets.

Each request is checked against Grafana's published Swagger description
(``grafana-http-api.swagger.json`` from ``$FLOWLINE_SCHEMAS_DIR``): the path and method must exist, query
parameters must be declared, and the JSON body must validate against the operation's schema AND
contain no key the schema does not define (the published schemas allow unknown keys; Grafana
silently ignores them, which hides client bugs). Saved dashboards are also validated against the
dashboard JSON schema. Folders, datasources, dashboards and annotations are kept in memory so a
second provisioning run can be shown to update in place instead of duplicating.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema

from tests.openapi_stub import JSON, JsonApiServer, RequestRejected, Route, UndefinedKeys, first_error, path_pattern

# Where the published Swagger file contradicts what Grafana reads and writes (generator artefacts),
# corrected here and only here, so every other field is checked exactly as published:
# - alert rules' ``for`` and a file's rule-group ``interval`` are Prometheus durations, (un)marshalled
#   as strings ("5m"), typed in the file as int64 nanoseconds;
# - a contact point's ``type`` enum was split on ", " without trimming (" email", " webhook", ...);
# - an exported query's ``model`` (a free-form map, like AlertQuery's) allows no property at all.
_DURATION: JSON = {"type": "string", "pattern": r"^\d+[smhd]$"}
SWAGGER_CORRECTIONS: dict[tuple[str, str], Any] = {
    ("ProvisionedAlertRule", "for"): _DURATION,
    ("AlertRuleExport", "for"): _DURATION,
    ("AlertRuleGroupExport", "interval"): _DURATION,
    ("EmbeddedContactPoint", "type"): lambda schema: {**schema, "enum": [v.strip() for v in schema["enum"]]},
    ("AlertQueryExport", "model"): {"type": "object"},
}


class SwaggerContract(UndefinedKeys):
    """Path matching and request validation from a Swagger 2.0 document."""

    def __init__(self, swagger_path: Path, dashboard_schema_path: Path) -> None:
        self.doc: JSON = json.loads(swagger_path.read_text(encoding="utf-8"))
        for (definition, prop), fix in SWAGGER_CORRECTIONS.items():
            props = self.doc["definitions"][definition]["properties"]
            props[prop] = fix(props[prop]) if callable(fix) else fix
        self.base = self.doc.get("basePath", "")
        routes = []
        for template, ops in self.doc["paths"].items():
            for method, op in ops.items():
                if method != "parameters":
                    routes.append(Route(method.upper(), template, path_pattern(template), op))
        # Literal segments win over placeholders (/datasources/uid/x before /datasources/{id}/...).
        self.routes = sorted(routes, key=lambda r: r.template.count("{"))
        self.dashboard_validator = jsonschema.Draft7Validator(
            json.loads(dashboard_schema_path.read_text(encoding="utf-8"))
        )

    def route(self, method: str, path: str) -> Route:
        if not path.startswith(self.base + "/"):
            raise RequestRejected(404, f"{path} is outside the API base path {self.base}")
        rel = path[len(self.base) :]
        matching = [r for r in self.routes if r.pattern.match(rel)]
        if not matching:
            raise RequestRejected(404, f"no API path matches {rel}")
        for r in matching:
            if r.method == method:
                return r
        raise RequestRejected(405, f"{method} is not defined for {matching[0].template}")

    def _deref(self, schema: JSON) -> JSON:
        while "$ref" in schema:
            schema = self.doc["definitions"][schema["$ref"].removeprefix("#/definitions/")]
        return schema

    def validate_definition(self, name: str, value: Any) -> list[str]:
        """Errors of ``value`` against a definition, unknown keys included (empty when valid)."""
        schema = {"$ref": f"#/definitions/{name}", "definitions": self.doc["definitions"]}
        errors = [f"{list(e.path)}: {e.message[:200]}" for e in jsonschema.Draft4Validator(schema).iter_errors(value)]
        return errors + [f"unknown key {k}" for k in self.unknown_keys({"$ref": f"#/definitions/{name}"}, value)]

    def check(self, route: Route, query: dict[str, list[str]], body: Any) -> None:
        params = route.operation.get("parameters", [])
        declared_query = {p["name"] for p in params if p["in"] == "query"}
        extra = sorted(set(query) - declared_query)
        if extra:
            raise RequestRejected(400, f"{route.template}: undeclared query parameters {extra}")
        body_params = [p for p in params if p["in"] == "body"]
        if not body_params:
            if body not in (None, {}, b""):
                raise RequestRejected(400, f"{route.method} {route.template} takes no body")
            return
        schema = body_params[0].get("schema", {})
        if body is None and body_params[0].get("required"):
            raise RequestRejected(400, f"{route.method} {route.template} needs a JSON body")
        # Swagger 2.0 schemas are JSON Schema draft 4; their $refs point into the document's definitions.
        wrapped = {**schema, "definitions": self.doc["definitions"]} if "$ref" in schema else schema
        validator = jsonschema.Draft4Validator(wrapped)
        error = first_error(validator.iter_errors(body))
        if error is not None:
            raise RequestRejected(400, f"{route.template}: {error.message} at {list(error.path)}")
        unknown = self.unknown_keys(schema, body)
        if unknown:
            raise RequestRejected(400, f"{route.template}: keys the API does not define: {unknown}")


@dataclass
class GrafanaState:
    folders: dict[str, JSON] = field(default_factory=dict)
    datasources: dict[str, JSON] = field(default_factory=dict)
    dashboards: dict[str, JSON] = field(default_factory=dict)  # uid -> {"dashboard", "folderUid", "version"}
    annotations: list[JSON] = field(default_factory=list)
    contact_points: dict[str, JSON] = field(default_factory=dict)
    alert_rules: dict[str, JSON] = field(default_factory=dict)
    # A site's own tree before Flowline arrives: its route must survive provisioning.
    policies: JSON = field(
        default_factory=lambda: {
            "receiver": "grafana-default-email",
            "group_by": ["grafana_folder", "alertname"],
            "routes": [{"receiver": "grafana-default-email", "object_matchers": [["team", "=", "it"]]}],
        }
    )


class GrafanaStub(JsonApiServer):
    def __init__(self, contract: SwaggerContract, token: str) -> None:
        self.contract = contract
        self.token = token
        self.state = GrafanaState()
        self._ids = itertools.count(1)
        super().__init__()

    # --- request handling -----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        try:
            if headers.get("Authorization") != f"Bearer {self.token}":
                raise RequestRejected(401, "missing or wrong service-account token")
            body = json.loads(raw_body) if raw_body else None
            route = self.contract.route(method, parts.path)
            self.contract.check(route, parse_qs(parts.query), body)
            with self._lock:
                self.requests.append((method, route.template))
                return self._apply(route, parts.path.split("/")[-1], body, parse_qs(parts.query))
        except RequestRejected as exc:
            self.rejected.append(f"{method} {parts.path}: {exc.message}")
            return exc.status, {"message": exc.message}
        except json.JSONDecodeError as exc:
            self.rejected.append(f"{method} {parts.path}: body is not JSON ({exc})")
            return 400, {"message": "bad JSON"}

    def _apply(self, route: Route, last: str, body: Any, query: dict[str, list[str]]) -> tuple[int, Any]:
        s = self.state
        key = (route.method, route.template)
        if key == ("GET", "/folders/{folder_uid}"):
            return (200, s.folders[last]) if last in s.folders else (404, {"message": "folder not found"})
        if key == ("POST", "/folders"):
            uid = body.get("uid") or f"f{next(self._ids)}"
            if uid in s.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            s.folders[uid] = {"id": next(self._ids), "uid": uid, "title": body["title"], "version": 1}
            return 200, s.folders[uid]
        if key == ("PUT", "/folders/{folder_uid}"):
            folder = s.folders.get(last)
            if folder is None:
                return 404, {"message": "folder not found"}
            folder.update(title=body.get("title", folder["title"]), version=folder["version"] + 1)
            return 200, folder
        if key == ("GET", "/datasources/uid/{uid}"):
            if last not in s.datasources:
                return 404, {"message": "Data source not found"}
            stored = dict(s.datasources[last])
            secure = stored.pop("secureJsonData", {})
            return 200, {**stored, "secureJsonFields": {k: True for k in secure}}
        if key == ("POST", "/datasources"):
            if any(d["name"] == body["name"] for d in s.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            uid = body.get("uid") or f"ds{next(self._ids)}"
            s.datasources[uid] = {**body, "uid": uid, "id": next(self._ids), "version": 1}
            return 200, {
                "datasource": s.datasources[uid],
                "id": s.datasources[uid]["id"],
                "message": "Datasource added",
            }
        if key == ("PUT", "/datasources/uid/{uid}"):
            old = s.datasources.get(last)
            if old is None:
                return 404, {"message": "Data source not found"}
            s.datasources[last] = {**body, "uid": last, "id": old["id"], "version": old["version"] + 1}
            return 200, {"datasource": s.datasources[last], "id": old["id"], "message": "Datasource updated"}
        if key == ("GET", "/dashboards/uid/{uid}"):
            if last not in s.dashboards:
                return 404, {"message": "Dashboard not found"}
            entry = s.dashboards[last]
            return 200, {
                "dashboard": {**entry["dashboard"], "id": entry["id"], "version": entry["version"]},
                "meta": {"folderUid": entry["folderUid"], "version": entry["version"]},
            }
        if key == ("POST", "/dashboards/db"):
            return self._save_dashboard(body)
        if key == ("GET", "/annotations"):
            return 200, self._find_annotations(query)
        if key == ("POST", "/annotations"):
            s.annotations.append({**body, "id": next(self._ids)})
            return 200, {"id": s.annotations[-1]["id"], "message": "Annotation added"}
        if key[1].startswith("/v1/provisioning/"):
            return self._alerting(key, last, body)
        if key == ("GET", "/search"):
            return 200, [
                {"uid": uid, "title": e["dashboard"]["title"], "type": "dash-db"} for uid, e in s.dashboards.items()
            ]
        return 501, {"message": f"the stub does not implement {route.method} {route.template}"}

    def _alerting(self, key: tuple[str, str], last: str, body: Any) -> tuple[int, Any]:
        """Contact points, alert rules and the policy tree, with the checks Grafana makes."""
        s = self.state
        if key == ("GET", "/v1/provisioning/contact-points"):
            return 200, list(s.contact_points.values())
        if key in (("POST", "/v1/provisioning/contact-points"), ("PUT", "/v1/provisioning/contact-points/{UID}")):
            uid = last if key[0] == "PUT" else body.get("uid") or f"cp{next(self._ids)}"
            if key[0] == "POST" and uid in s.contact_points:
                return 409, {"message": "contact point with this uid already exists"}
            if key[0] == "PUT" and uid not in s.contact_points:
                return 404, {"message": "contact point not found"}
            s.contact_points[uid] = {**body, "uid": uid}
            return 202, s.contact_points[uid]
        if key == ("GET", "/v1/provisioning/alert-rules/{UID}"):
            return (200, s.alert_rules[last]) if last in s.alert_rules else (404, {"message": "rule not found"})
        if key in (("POST", "/v1/provisioning/alert-rules"), ("PUT", "/v1/provisioning/alert-rules/{UID}")):
            if body["folderUID"] not in s.folders:
                return 400, {"message": f"folder {body['folderUID']} not found"}
            uid = last if key[0] == "PUT" else body["uid"]
            if (key[0] == "POST") == (uid in s.alert_rules):
                return (409, {"message": "rule exists"}) if key[0] == "POST" else (404, {"message": "not found"})
            s.alert_rules[uid] = {**body, "provenance": "api"}
            return 201 if key[0] == "POST" else 200, s.alert_rules[uid]
        if key == ("GET", "/v1/provisioning/policies"):
            return 200, s.policies
        if key == ("PUT", "/v1/provisioning/policies"):
            names = {cp["name"] for cp in s.contact_points.values()} | {"grafana-default-email"}
            unknown = sorted(set(_receivers(body)) - names)
            if unknown:
                return 400, {"message": f"receivers do not exist: {unknown}"}
            s.policies = body
            return 202, {"message": "policies updated"}
        return 501, {"message": f"the stub does not implement {key[0]} {key[1]}"}

    def _find_annotations(self, query: dict[str, list[str]]) -> list[JSON]:
        """Grafana's filter: every requested tag present, time within [from, to], same dashboard."""
        start = int(query.get("from", ["0"])[0])
        end = int(query.get("to", [str(2**62)])[0])
        tags = set(query.get("tags", []))
        dashboard = query.get("dashboardUID", [None])[0]
        found = [
            a
            for a in self.state.annotations
            if start <= a.get("time", 0) <= end
            and tags <= set(a.get("tags", []))
            and (dashboard is None or a.get("dashboardUID") == dashboard)
        ]
        return found[: int(query.get("limit", ["100"])[0])]

    def _save_dashboard(self, body: JSON) -> tuple[int, Any]:
        dashboard = body["dashboard"]
        errors = list(self.contract.dashboard_validator.iter_errors(dashboard))
        if errors:
            raise RequestRejected(400, f"dashboard does not match the dashboard schema: {errors[0].message[:200]}")
        folder = body.get("folderUid", "")
        if folder and folder not in self.state.folders:
            return 400, {"message": "folder not found"}
        uid = dashboard["uid"]
        existing = self.state.dashboards.get(uid)
        if existing is not None and not body.get("overwrite"):
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        entry_id = existing["id"] if existing else next(self._ids)
        version = existing["version"] + 1 if existing else 1
        stored = {k: v for k, v in dashboard.items() if k not in ("id", "version")}
        self.state.dashboards[uid] = {"dashboard": stored, "folderUid": folder, "id": entry_id, "version": version}
        return 200, {"id": entry_id, "uid": uid, "url": f"/d/{uid}", "status": "success", "version": version}


def _receivers(route: JSON) -> list[str]:
    return [route.get("receiver", ""), *(r for child in route.get("routes") or [] for r in _receivers(child))]
