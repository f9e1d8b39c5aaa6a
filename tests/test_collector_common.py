"""Collector plumbing with a real spool: group commit, loud back-pressure when full, bounded dead letters."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flowline.collectors.common import DeadLetter, SpoolSink
from flowline.metrics import Metrics
from flowline.points import TagRef, telemetry_point
from flowline.services import wait_until
from flowline.spool import SpoolReader, SpoolWriter, decode_points


def test_full_spool_holds_input_loudly_and_loses_nothing(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path / "spool", max_bytes=4096, segment_bytes=1024, fsync=False)
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=10, max_latency_s=0.01).start()
    ref = TagRef("s", "A", "t")
    acked: list[int] = []
    now = time.time_ns()
    for i in range(100):
        sink.submit([telemetry_point(ref, float(i), now + i)], lambda i=i: acked.append(i))  # type: ignore[misc]
    wait_until(lambda: metrics.counter("spool_full_total", spool="test") >= 1, 10, "spool full reported")
    assert len(acked) < 100  # held back, not acknowledged, not dropped
    reader = SpoolReader(tmp_path / "spool")
    values: list[float] = []

    def drain() -> bool:
        for record in reader.read(max_records=100):
            values.extend(float(p.fields["value"]) for p in decode_points(record.payload))
            reader.ack(record.end)
        return len(values) == 100

    wait_until(drain, 30, "every point through the full spool")
    sink.stop()
    writer.close()
    assert values == [float(i) for i in range(100)] and acked == list(range(100))
    assert metrics.counter("points_out_total") == 100


def test_dead_letter_file_is_bounded_and_rotates(tmp_path: Path) -> None:
    dead = DeadLetter(tmp_path / "dl.jsonl", max_bytes=2000)
    for i in range(50):
        dead.write("invalid_json", f"topic t/{i}", "bad", b"\xff\x00" if i % 2 else b"{oops")
    assert dead.path.stat().st_size <= 2000
    assert (tmp_path / "dl.jsonl.1").stat().st_size <= 2000
    entries = [json.loads(line) for line in dead.path.read_text().splitlines()]
    assert entries[-1]["where"] == "topic t/49" and entries[-1]["payload_b64"] == "/wA="
