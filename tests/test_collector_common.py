"""Collector plumbing with a real spool: group commit, loud back-pressure when full, bounded dead letters."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from flowline.collectors.common import SpoolSink
from flowline.core.metrics import Metrics
from flowline.core.points import Point, TagRef, telemetry_point
from flowline.core.spool import SpoolReader, SpoolWriter, decode_points, encode_points
from flowline.lab.services import wait_until
from tests.conftest import REPO


def _record_bytes(points: list[Point]) -> int:
    """What a record of these points takes in a spool (compressed payload and its header)."""
    return len(encode_points(points)) + 8


def _drain(spool: Path, count: int) -> list[float]:
    """Read and acknowledge the spool, as the relay would, until ``count`` values came through."""
    reader = SpoolReader(spool)
    values: list[float] = []

    def more() -> bool:
        for record in reader.read(max_records=100):
            values.extend(float(p.fields["value"]) for p in decode_points(record.payload))
            reader.ack(record.end)
        return len(values) >= count

    wait_until(more, 30, f"{count} values through the full spool")
    return values


def test_full_spool_holds_input_loudly_and_loses_nothing(tmp_path: Path) -> None:
    ref = TagRef("s", "A", "t")
    now = time.time_ns()
    record = _record_bytes([telemetry_point(ref, float(i), now + i) for i in range(10)])
    # room for about two 10-point records, one per segment
    writer = SpoolWriter(tmp_path / "spool", max_bytes=record * 5 // 2, segment_bytes=record, fsync=False)
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=10, max_latency_s=0.01).start()
    acked: list[int] = []
    for i in range(100):
        sink.submit([telemetry_point(ref, float(i), now + i)], lambda i=i: acked.append(i))  # type: ignore[misc]
    wait_until(lambda: metrics.counter("spool_full_total", spool="test") >= 1, 10, "spool full reported")
    assert len(acked) < 100  # held back, not acknowledged, not dropped
    values = _drain(tmp_path / "spool", 100)
    sink.stop()
    writer.close()
    assert values == [float(i) for i in range(100)] and acked == list(range(100))
    assert metrics.counter("points_out_total") == 100


def test_queue_is_bounded_in_points_and_try_submit_drops_loudly(tmp_path: Path) -> None:
    ref = TagRef("s", "A", "t")
    now = time.time_ns()

    def batch(k: int) -> list[Point]:
        return [telemetry_point(ref, float(k * 100 + j), now) for j in range(100)]

    # room for about two 100-point records: then the spool is full and the writer thread holds
    record = _record_bytes(batch(0))
    writer = SpoolWriter(tmp_path / "spool", max_bytes=record * 5 // 2, segment_bytes=record * 2, fsync=False)
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=100, max_latency_s=0.01, max_queued_points=250).start()

    submitted: list[int] = []

    def produce() -> None:
        for k in range(20):
            sink.submit(batch(k))
            submitted.append(k)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_until(lambda: metrics.counter("spool_full_total", spool="test") >= 1, 10, "spool full reported")
    wait_until(lambda: not sink.try_submit(batch(99)), 10, "the queue full")
    assert metrics.counter("dropped_total", reason="queue_full") == 100  # counted, never silent
    assert len(submitted) < 20  # the producer is held by the bound, not queueing without limit
    values = _drain(tmp_path / "spool", 2000)
    producer.join(10)
    sink.stop()
    writer.close()
    assert sorted(values) == [float(i) for i in range(2000)]  # the refused try_submit batch is not there


def test_collectors_sample_config_is_valid() -> None:
    from flowline.core.config import load_config

    config = load_config(REPO / "collectors" / "collectors.sample.yaml")
    assert config.collectors.opcua is not None and config.collectors.mqtt is not None
    assert config.collectors.opcua.servers["default"].security.policy == "Basic256Sha256"
    assert config.collectors.mqtt.qos == 1 and not config.collectors.mqtt.clean_start
