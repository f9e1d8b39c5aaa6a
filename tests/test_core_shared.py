"""The core's shared helpers, each written once: durable file replacement, back-off, dead letters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flowline.core.backoff import Backoff
from flowline.core.deadletter import DeadLetterFile
from flowline.core.files import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_whole_and_fsyncs_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_json(target, {"seq": 7})
    assert json.loads(target.read_text()) == {"seq": 7}
    assert len(synced) == 2, "the data and the folder entry must both reach the disk"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file is left behind"


def test_advisory_write_skips_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    atomic_write_bytes(tmp_path / "status.json", b"{}", durable=False)
    assert calls == [] and (tmp_path / "status.json").read_bytes() == b"{}"


def test_backoff_grows_to_its_ceiling_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 8.0)
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert max(delays[6:]) > 2.0, "the ceiling must have grown past the first attempts'"
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    with pytest.raises(ValueError, match="0 < low <= high"):
        Backoff(5, 1)


def test_dead_letter_file_is_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "dead.jsonl", max_bytes=4000)
    for i in range(200):
        dead.add("bad_request", "x" * 50, where="influxdb", line=f"m f={i}i {i}", status=400)
    total = sum(p.stat().st_size for p in (dead.path, dead.rotated_path))
    assert total <= 4000
    newest = dead.records()[-1]
    assert newest["line"] == "m f=199i 199" and newest["status"] == 400 and newest["reason"] == "bad_request"


def test_dead_letter_keeps_raw_payloads_readable_or_base64(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "dl.jsonl", max_bytes=2000)
    for i in range(50):
        dead.add("invalid_json", "bad", where=f"topic t/{i}", payload=b"\xff\x00" if i % 2 else b"{oops")
    assert dead.path.stat().st_size <= 1000 and dead.rotated_path.stat().st_size <= 1000
    records = dead.records()
    assert records[-1]["where"] == "topic t/49" and records[-1]["payload_b64"] == "/wA="
    assert records[-2]["payload"] == "{oops"


def test_dead_letter_cuts_an_oversized_payload_and_says_so(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "dl.jsonl", max_bytes=4000)
    dead.add("too_large", "payload over the limit", where="topic big", payload=b"a" * 10_000)
    (record,) = dead.records()
    assert record["truncated"] is True and len(str(record["payload"])) == 1000
