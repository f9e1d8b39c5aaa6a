"""HistorianWriter against the real InfluxDB 1.6 with authentication on."""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from flowline.core.config import HistorianConfig
from flowline.core.metrics import Metrics
from flowline.core.points import Point, Quality, TagRef, telemetry_point
from flowline.core.secrets import SecretError, SecretRef
from flowline.historian import (
    Connection,
    DeadLetterFile,
    HistorianAuthError,
    HistorianNotFoundError,
    HistorianUnavailableError,
    HistorianWriter,
    WriteResult,
)
from flowline.historian.query import HistorianReader
from flowline.lab.services import InfluxDServer, InfluxUser, free_port, wait_until

T0 = 1_700_000_000_000_000_000


def make_points(n: int, start: int = T0, asset: str = "P-101") -> list[Point]:
    return [
        telemetry_point(TagRef("north-field", asset, f"t{i % 7}", "degC"), i * 0.25, start + i * 1_000_000)
        for i in range(n)
    ]


def count(influx: InfluxDServer, db: str, measurement: str = "telemetry", field: str = "value") -> int:
    result = influx.query(f'SELECT count("{field}") FROM "{measurement}"', db)
    series = result["results"][0].get("series")  # type: ignore[index]
    return int(series[0]["values"][0][1]) if series else 0


def user(influx: InfluxDServer, db: str, privilege: str) -> Connection:
    name, password = f"u_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    influx.create_user(InfluxUser(name, password, grants=((db, privilege),)))
    return Connection(influx.url, db, username=name, password=password)


def test_bisects_a_field_type_conflict_to_the_dead_letter_and_writes_the_rest(
    influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    metrics = Metrics("historian", "north-field", "test")
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    writer = HistorianWriter(user(influx, influx_db, "WRITE"), batch_max_points=400, dead_letter=dead, metrics=metrics)
    good = make_points(2000)
    writer.write(good[:1])  # fixes the type of "value" as float
    bad = [
        Point("telemetry", {"site": "north-field", "asset": "P-101", "tag": "t0"}, {"value": "oops"}, T0 + k)
        for k in (11, 222_222, 1_333_333_333)
    ]
    batch = [*good[:100], bad[0], *good[100:900], bad[1], *good[900:], bad[2]]

    result = writer.write(batch)

    assert (result.written, result.dead_lettered) == (2000, 3)
    assert count(influx, influx_db) == 2000
    records = dead.records()
    assert [r["line"] for r in records] == [p.to_line() for p in bad]
    assert all("field type conflict" in str(r["message"]) and r["status"] == 400 for r in records)
    assert metrics.counter("dead_letter_total", reason="field_type_conflict") == 3
    assert metrics.total("points_out_total") == 2001


def test_a_batch_refused_as_a_whole_is_dead_lettered_without_bisecting(
    influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    writer = HistorianWriter(user(influx, influx_db, "WRITE"), dead_letter=DeadLetterFile(tmp_path / "d.jsonl"))
    writer.write(make_points(1))
    wrong = [Point("telemetry", p.tags, {"value": "text"}, p.timestamp_ns + 1) for p in make_points(1000)]
    result = writer.write(wrong)
    assert (result.written, result.dead_lettered, result.requests) == (0, 1000, 1)


def test_unrepresentable_points_go_to_the_dead_letter_not_the_server(
    influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    writer = HistorianWriter(user(influx, influx_db, "WRITE"), dead_letter=dead)
    broken = [
        Point("telemetry", {"site": "a\nb", "asset": "x", "tag": "y"}, {"value": 1.0}, T0),
        Point("telemetry", {"site": "s", "asset": "x", "tag": "y"}, {"value": "\ud800"}, T0),
        Point("telemetry", {"site": "s", "asset": "x", "tag": "y"}, {}, T0),
    ]
    result = writer.write([*broken, *make_points(10)])
    assert (result.written, result.dead_lettered) == (10, 3)
    assert {r["reason"] for r in dead.records()} == {"unrepresentable"}
    assert count(influx, influx_db) == 10


def test_replaying_a_batch_rewrites_identical_points(influx: InfluxDServer, influx_db: str) -> None:
    writer = HistorianWriter(user(influx, influx_db, "WRITE"), batch_max_points=333)
    points = make_points(1000)
    first, replay = writer.write(points), writer.write(points)
    assert first == replay and first.written == 1000
    assert count(influx, influx_db) == 1000
    reader = HistorianReader(user(influx, influx_db, "READ"))
    frame = reader.query_df('SELECT "value" FROM "telemetry" WHERE "tag" = \'t3\'')
    expected = sorted(p.fields["value"] for p in points if p.tags["tag"] == "t3")
    assert sorted(frame["value"]) == expected


def test_wrong_password_raises_auth_error_without_retrying(influx: InfluxDServer, influx_db: str) -> None:
    conn = user(influx, influx_db, "WRITE")
    metrics = Metrics("historian", "north-field", "test")
    writer = HistorianWriter(
        Connection(influx.url, influx_db, username=conn.username, password="wrong"),
        retry_deadline_s=600,
        metrics=metrics,
    )
    with pytest.raises(HistorianAuthError, match=r"refused user .*401"):
        writer.write(make_points(5))
    assert metrics.counter("write_errors_total", status="401") == 1
    with pytest.raises(HistorianAuthError, match="401"):
        HistorianWriter(Connection(influx.url, influx_db), retry_deadline_s=600).write(make_points(1))


def test_least_privilege_write_only_cannot_read_and_read_only_cannot_write(
    influx: InfluxDServer, influx_db: str
) -> None:
    writer_conn, reader_conn = user(influx, influx_db, "WRITE"), user(influx, influx_db, "READ")
    assert HistorianWriter(writer_conn).write(make_points(3)).written == 3
    with pytest.raises(HistorianAuthError, match="not allowed to query"):
        HistorianReader(writer_conn).query('SELECT * FROM "telemetry"')
    with pytest.raises(HistorianAuthError, match="not allowed to write"):
        HistorianWriter(reader_conn, retry_deadline_s=600).write(make_points(3))
    assert len(HistorianReader(reader_conn).query_df('SELECT * FROM "telemetry"')) == 3


def test_missing_database_is_a_clear_error_not_a_dead_letter(
    influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    admin = Connection(influx.url, "no_such_db", username=influx.admin.name, password=influx.admin.password)
    with pytest.raises(HistorianNotFoundError, match="no_such_db"):
        HistorianWriter(admin, dead_letter=dead).write(make_points(2))
    no_policy = Connection(
        influx.url, influx_db, "no_such_rp", username=influx.admin.name, password=influx.admin.password
    )
    with pytest.raises(HistorianNotFoundError, match="retention policy not found"):
        HistorianWriter(no_policy, dead_letter=dead, retry_deadline_s=600).write(make_points(2))
    assert dead.records() == []


def test_unreachable_server_gives_up_at_the_deadline() -> None:
    writer = HistorianWriter(
        Connection(f"http://127.0.0.1:{free_port()}", "db"), retry_deadline_s=0.5, backoff_initial_s=0.05
    )
    with pytest.raises(HistorianUnavailableError, match="unreachable"):
        writer.write(make_points(2))


def test_retries_across_an_influxdb_restart(
    influx_factory: Callable[..., InfluxDServer], tmp_path: Path
) -> None:
    server = influx_factory(auth=True)
    server.create_database("plant")
    conn = user(server, "plant", "WRITE")
    metrics = Metrics("historian", "north-field", "test")
    writer = HistorianWriter(conn, retry_deadline_s=120, backoff_initial_s=0.05, backoff_max_s=0.5, metrics=metrics)
    server.stop()
    outcome: list[WriteResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(writer.write(make_points(500)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: metrics.counter("write_errors_total", status="network") >= 2, 30, "failed attempts")
    server.start()
    thread.join(timeout=120)
    assert outcome and isinstance(outcome[0], WriteResult), outcome
    assert outcome[0].written == 500
    assert count(server, "plant") == 500


def test_precision_ms_truncates_timestamps_consistently(influx: InfluxDServer, influx_db: str) -> None:
    writer = HistorianWriter(user(influx, influx_db, "WRITE"), precision="ms")
    point = telemetry_point(TagRef("s", "a", "t"), 1.0, T0 + 123_456_789, Quality.GOOD)
    writer.write([point])
    frame = HistorianReader(user(influx, influx_db, "READ")).query_df('SELECT "value" FROM "telemetry"')
    assert frame["time"].iloc[0].value == T0 + 123_000_000
    with pytest.raises(ValueError, match="precision"):
        HistorianWriter(Connection(influx.url), precision="us")  # type: ignore[arg-type]



class _FlakyFront(http.server.ThreadingHTTPServer):
    """Answers the first writes with the given statuses, then forwards to the real InfluxDB."""

    def __init__(self, upstream: str, statuses: list[tuple[int, str | None]]) -> None:
        self.upstream, self.statuses = upstream, statuses
        self.seen: list[int] = []
        super().__init__(("127.0.0.1", 0), _FlakyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyFront

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.statuses:
            status, retry_after = self.server.statuses.pop(0)
            self.server.seen.append(status)
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            payload = b'{"error":"busy"}'
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k in ("Authorization", "Content-Encoding", "Content-Type")}
        answer = requests.post(self.server.upstream + self.path, data=body, headers=headers, timeout=10)
        self.server.seen.append(answer.status_code)
        self.send_response(answer.status_code)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *args: object) -> None:
        pass


def test_retries_5xx_and_429_honouring_retry_after(influx: InfluxDServer, influx_db: str) -> None:
    front = _FlakyFront(influx.url, [(503, None), (429, "1"), (502, None)])
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        target = user(influx, influx_db, "WRITE")
        metrics = Metrics("historian", "north-field", "test")
        writer = HistorianWriter(
            Connection(front.url, influx_db, username=target.username, password=target.password),
            backoff_initial_s=0.01, metrics=metrics,
        )
        result = writer.write(make_points(50))
    finally:
        front.shutdown()
    assert result.written == 50 and result.requests == 4
    assert front.seen == [503, 429, 502, 204]
    assert {s: metrics.counter("write_errors_total", status=s) for s in ("503", "429", "502")} == {
        "503": 1, "429": 1, "502": 1
    }
    assert count(influx, influx_db) == 50


def test_from_config_reads_secrets_and_places_the_dead_letter(
    influx: InfluxDServer, influx_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = user(influx, influx_db, "WRITE")
    monkeypatch.setenv("HISTORIAN_PW", target.password or "")
    config = HistorianConfig(
        url=influx.url, database=influx_db, username=target.username,
        password=SecretRef(env="HISTORIAN_PW"), batch_max_points=3, precision="s",
    )
    with HistorianWriter.from_config(config, dead_letter_path=tmp_path / "dl.jsonl") as writer:
        bad = Point("telemetry", {"site": "s", "asset": "a", "tag": "t"}, {"value": "x"}, T0)
        result = writer.write([*make_points(5), bad])
    assert (result.written, result.dead_lettered) == (5, 1)
    assert DeadLetterFile(tmp_path / "dl.jsonl").records()[0]["reason"] == "field_type_conflict"
    monkeypatch.delenv("HISTORIAN_PW")
    with pytest.raises(SecretError, match="HISTORIAN_PW"):
        HistorianWriter.from_config(config)
