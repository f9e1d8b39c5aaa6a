"""The OT/DMZ spool, tested like a disk buffer: a reference model, invariants, limits, torn tails, kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flowline.core.points import Point
from flowline.core.spool import (
    Position,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
    SpoolReader,
    SpoolWriter,
    decode_points,
    encode_points,
    encode_record,
)

# --- reference model -------------------------------------------------------------------------------


class SpoolModel(RuleBasedStateMachine):
    """Random appends, reads, acks, reopens and segment rolls against an in-memory list."""

    @initialize(segment_bytes=st.sampled_from([64, 300, 4096]))
    def open(self, segment_bytes: int) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.segment_bytes = segment_bytes
        self.writer = SpoolWriter(self.folder, segment_bytes=segment_bytes, fsync=False)
        self.reader = SpoolReader(self.folder)
        self.model: list[bytes] = []
        self.acked = 0  # model index of the first unacknowledged record
        self.cursor = 0  # model index the next read starts at
        self.cursor_pos: Position = self.reader.acked
        self.counter = 0

    @rule(sizes=st.lists(st.integers(0, 200), min_size=1, max_size=5))
    def append(self, sizes: list[int]) -> None:
        batch = []
        for size in sizes:
            self.counter += 1
            batch.append(f"{self.counter}:".encode() + bytes(random.getrandbits(8) for _ in range(size)))
        self.writer.append(batch)
        self.model.extend(batch)

    @rule(n=st.integers(1, 7))
    def read(self, n: int) -> None:
        records = self.reader.read(after=self.cursor_pos, max_records=n)
        expected = self.model[self.cursor : self.cursor + n]
        assert [r.payload for r in records] == expected
        if records:
            self.cursor += len(records)
            self.cursor_pos = records[-1].end

    @rule()
    def ack(self) -> None:
        self.reader.ack(self.cursor_pos)
        self.acked = self.cursor

    @rule()
    def reopen_writer(self) -> None:
        self.writer.close()
        self.writer = SpoolWriter(self.folder, segment_bytes=self.segment_bytes, fsync=False)

    @rule()
    def reopen_reader(self) -> None:
        self.reader = SpoolReader(self.folder)
        self.cursor, self.cursor_pos = self.acked, self.reader.acked

    @precondition(lambda self: self.cursor > self.acked)
    @rule()
    def rewind_to_ack(self) -> None:
        """A sender that lost its connection re-reads from the acknowledged position."""
        self.cursor, self.cursor_pos = self.acked, self.reader.acked

    @invariant()
    def unacknowledged_is_exactly_the_rest(self) -> None:
        if not hasattr(self, "reader"):
            return
        records = self.reader.read(max_records=10_000)
        assert [r.payload for r in records] == self.model[self.acked :]
        assert (self.reader.pending_bytes() == 0) == (self.acked == len(self.model))

    def teardown(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


TestSpoolModel = SpoolModel.TestCase
TestSpoolModel.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- cold start, locking, limits -------------------------------------------------------------------


def test_point_records_are_compressed_and_old_json_records_still_read() -> None:
    tags = [{"site": "s", "asset": "A", "tag": f"t{i % 7}"} for i in range(500)]
    points = [Point("telemetry", tag, {"value": i / 3}, i) for i, tag in enumerate(tags)]
    record = encode_points(points)
    assert record[:1] == b"\x78" and decode_points(record) == points
    wire = b'[["m",{"a":"b"},{"v":1.5},7]]'  # as written before compression
    assert decode_points(wire) == [Point("m", {"a": "b"}, {"v": 1.5}, 7)]
    with pytest.raises(SpoolError, match="not a point record"):
        decode_points(b"garbage")


def test_cold_start(tmp_path: Path) -> None:
    reader = SpoolReader(tmp_path / "new")
    assert reader.read() == [] and reader.pending_bytes() == 0 and reader.dropped_records == 0
    with SpoolWriter(tmp_path / "new") as writer:
        writer.append([b"a"])
    assert [r.payload for r in reader.read()] == [b"a"]


def test_one_writer_per_folder(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path), pytest.raises(SpoolLockedError):
        SpoolWriter(tmp_path)


def test_refuse_is_the_default_when_full(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, max_bytes=1000, segment_bytes=300)
    for _ in range(9):
        writer.append([b"x" * 100])
    with pytest.raises(SpoolFullError, match="full"):
        writer.append([b"x" * 100])
    # Acknowledging frees whole segments, after which appends succeed again.
    reader = SpoolReader(tmp_path)
    reader.ack(reader.read(max_records=100)[-1].end)
    writer.append([b"y" * 100])
    assert [r.payload for r in reader.read()][-1] == b"y" * 100


def test_drop_oldest_counts_what_it_dropped(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, max_bytes=1000, segment_bytes=250, on_full="drop_oldest")
    for i in range(30):
        writer.append([f"{i:03d}".encode() * 25])
    reader = SpoolReader(tmp_path)
    survivors = [int(r.payload[:3]) for r in reader.read(max_records=100)]
    assert writer.dropped_records > 0
    assert reader.dropped_records == writer.dropped_records  # the reader can tell what was lost
    assert survivors == list(range(30 - len(survivors), 30))  # oldest gone, newest kept, in order
    assert writer.dropped_records + len(survivors) == 30
    writer.close()
    assert SpoolWriter(tmp_path, on_full="drop_oldest").dropped_records == reader.dropped_records  # persisted


# --- torn and garbage tails ------------------------------------------------------------------------


def _newest_segment(folder: Path) -> Path:
    return sorted(folder.glob("seg-*.log"))[-1]


@pytest.mark.parametrize("damage", ["truncate-mid-record", "truncate-mid-header", "junk", "zeros", "bad-crc"])
def test_torn_or_garbage_tail_is_never_replayed(tmp_path: Path, damage: str) -> None:
    with SpoolWriter(tmp_path) as writer:
        writer.append([b"first" * 10, b"second" * 10])
        writer.append([b"third" * 10])
    segment = _newest_segment(tmp_path)
    data = segment.read_bytes()
    last = len(encode_record(b"third" * 10))
    damaged = {
        "truncate-mid-record": data[: len(data) - last // 2],
        "truncate-mid-header": data[: len(data) - last + 3],
        "junk": data + os.urandom(37),
        "zeros": data + b"\0" * 64,
        "bad-crc": data[:-1] + bytes([data[-1] ^ 0xFF]),
    }[damage]
    segment.write_bytes(damaged)
    intact = [b"first" * 10, b"second" * 10] + ([b"third" * 10] if damage in ("junk", "zeros") else [])
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in reader.read()] == intact  # before the writer recovers
    with SpoolWriter(tmp_path) as writer:  # reopening cuts the tail and starts a fresh segment
        writer.append([b"after"])
    assert [r.payload for r in reader.read()] == [*intact, b"after"]
    assert len(_newest_segment(tmp_path).read_bytes()) == len(encode_record(b"after"))


# --- kill -9 of a writer process ----------------------------------------------------------------------

_CHILD = r"""
import sys
from flowline.core.spool import SpoolWriter
folder, start = sys.argv[1], int(sys.argv[2])
writer = SpoolWriter(folder, segment_bytes=64 << 10)
n = start
while True:
    batch = [(f"{i}:" + "v" * (i % 300)).encode() for i in range(n, n + 1 + n % 7)]
    writer.append(batch)
    n += len(batch)
    print(n - 1, flush=True)  # everything up to here is durable
"""


def _valid(payload: bytes) -> int:
    number, _, pad = payload.partition(b":")
    i = int(number)
    assert pad == b"v" * (i % 300), f"garbage record replayed: {payload[:60]!r}"
    return i


def test_kill_9_at_random_instants_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(1234)
    confirmed = -1
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(confirmed + 1)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        deadline = time.monotonic() + rng.uniform(0.2, 0.8)
        first = child.stdout.readline()  # wait until it runs, then let it go for a random while
        assert first, "writer child did not start"
        confirmed = max(confirmed, int(first))
        while time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        lines = [int(x) for x in out.split()]
        if lines:
            confirmed = max(confirmed, lines[-1])
    seen = {_valid(r.payload) for r in SpoolReader(tmp_path).read(max_records=10**7, max_bytes=1 << 40)}
    missing = set(range(confirmed + 1)) - seen
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:5]}"
