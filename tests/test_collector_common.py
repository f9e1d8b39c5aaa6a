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
from tests.spool_faults import FaultyFileOps


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


def test_full_spool_refuses_input_loudly_and_loses_nothing_accepted(tmp_path: Path) -> None:
    ref = TagRef("s", "A", "t")
    now = time.time_ns()
    record = _record_bytes([telemetry_point(ref, float(i), now + i) for i in range(10)])
    # room for about two 10-point records, one per segment
    writer = SpoolWriter(tmp_path / "spool", max_bytes=record * 5 // 2, segment_bytes=record, fsync=False)
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=10, max_latency_s=0.01).start()
    came_back = threading.Event()
    sink.on_accepting(came_back.set)
    accepted: list[int] = []
    acked: list[int] = []
    refused = 0
    i = 0
    deadline = time.monotonic() + 10
    while refused < 5 and time.monotonic() < deadline:
        if sink.submit([telemetry_point(ref, float(i), now + i)], lambda i=i: acked.append(i)):  # type: ignore[misc]
            accepted.append(i)
        else:
            refused += 1
        i += 1
        time.sleep(0.002)
    assert refused == 5, "the full spool never refused input"
    assert metrics.counter("refused_total", reason="spool_full") == 5  # counted, never silent
    assert metrics.counter("spool_full_total", spool="test") >= 1 and metrics.gauge("spool_refusing", spool="test") == 1
    assert not sink.accepting and len(acked) < len(accepted)  # the held batch is not acknowledged
    values = _drain(tmp_path / "spool", len(accepted))  # the relay frees room
    assert came_back.wait(10) and sink.accepting and metrics.gauge("spool_refusing", spool="test") == 0
    assert sink.submit([telemetry_point(ref, 1e6, now)])  # accepted again
    values += _drain(tmp_path / "spool", 1)
    sink.stop()
    writer.close()
    assert values == [float(i) for i in accepted] + [1e6] and acked == accepted
    assert metrics.counter("points_out_total") == len(accepted) + 1


def test_queue_is_bounded_in_points_and_try_submit_drops_loudly(tmp_path: Path) -> None:
    ref = TagRef("s", "A", "t")
    now = time.time_ns()

    def batch(k: int) -> list[Point]:
        return [telemetry_point(ref, float(k * 100 + j), now) for j in range(100)]

    # A slow disk (0.2 s per fsync): the writer keeps storing, the producer is held by the bound.
    writer = SpoolWriter(tmp_path / "spool", file_ops=FaultyFileOps(fsync_delay_s=0.2))
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=100, max_latency_s=0.01, max_queued_points=250).start()
    submitted: list[int] = []

    def produce() -> None:
        for k in range(20):
            assert sink.submit(batch(k))
            submitted.append(k)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_until(lambda: not sink.try_submit(batch(99)), 10, "the queue full")
    assert metrics.counter("dropped_total", reason="queue_full") == 100  # counted, never silent
    assert len(submitted) < 20  # the producer is held by the bound, not queueing without limit
    values = _drain(tmp_path / "spool", 2000)
    producer.join(10)
    sink.stop()
    writer.close()
    assert sorted(values) == [float(i) for i in range(2000)]  # the dropped try_submit batch is not there
    assert metrics.counter("refused_total", reason="spool_full") == 0


def test_disk_errors_refuse_input_and_the_held_batch_is_stored_once_after(tmp_path: Path) -> None:
    ref = TagRef("s", "A", "t")
    now = time.time_ns()
    ops = FaultyFileOps(seed=5)
    writer = SpoolWriter(tmp_path / "spool", file_ops=ops)
    metrics = Metrics("collector-test", "s", "i")
    sink = SpoolSink(writer, metrics, "test", max_points=10, max_latency_s=0.01).start()
    acked: list[int] = []
    ops.arm("eio_write", "fsync_fail", "short_write")  # three failed attempts in a row, then a good one
    assert sink.submit([telemetry_point(ref, 0.0, now)], lambda: acked.append(0))
    wait_until(lambda: not sink.accepting, 10, "refusing after the first failed append")
    assert not sink.submit([telemetry_point(ref, 1.0, now)], lambda: acked.append(1))
    wait_until(lambda: sink.accepting, 10, "storing again")
    assert sink.submit([telemetry_point(ref, 2.0, now)], lambda: acked.append(2))
    values = _drain(tmp_path / "spool", 2)
    sink.stop()
    writer.close()
    assert values == [0.0, 2.0] and acked == [0, 2]  # nothing skipped or doubled by the retries
    assert metrics.counter("spool_errors_total", spool="test", error="SpoolWriteError") == 2
    assert metrics.counter("spool_full_total", spool="test") == 1  # the short write ran into ENOSPC
    assert metrics.counter("refused_total", reason="spool_full") + metrics.counter(
        "refused_total", reason="spool_error"
    ) == 1
    assert SpoolReader(tmp_path / "spool").skipped_bytes == 0


def test_collectors_sample_config_is_valid() -> None:
    from flowline.core.config import load_config

    config = load_config(REPO / "collectors" / "collectors.sample.yaml")
    assert config.collectors.opcua is not None and config.collectors.mqtt is not None
    assert config.collectors.opcua.servers["default"].security.policy == "Basic256Sha256"
    assert config.collectors.mqtt.qos == 1 and not config.collectors.mqtt.clean_start
