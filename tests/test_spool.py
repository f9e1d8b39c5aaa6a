"""The OT/DMZ spool, tested like a disk buffer: a reference model, invariants, limits, torn tails, kill -9."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flowline.core.points import Point
from flowline.core.spool import (
    OS_FILE_OPS,
    FileOps,
    Position,
    SpoolDiskFullError,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
    SpoolReader,
    SpoolWriteError,
    SpoolWriter,
    decode_points,
    encode_points,
    encode_record,
)
from tests.spool_faults import OTHER_FAULTS, WRITE_FAULTS, FaultyFileOps, PowerLoss

# --- reference model -------------------------------------------------------------------------------


def _check_read(payloads: list[bytes], expected: list[bytes], start: int, maybe: set[bytes], lost: set[bytes]) -> int:
    """Walk records read against the expected (acknowledged) ones from index ``start``; returns the
    index after the last one matched. Records of failed appends (``maybe``) may show up (delivery is
    at least once), corrupted ones (``lost``) never; nothing acknowledged may be missing or reordered."""
    index = start
    for payload in payloads:
        # (a corrupted record may still be read as the copy an earlier, failed attempt left)
        assert payload not in lost or payload in maybe, f"a corrupted record was handed out: {payload[:20]!r}"
        if index < len(expected) and payload == expected[index]:
            index += 1
        else:
            assert payload in maybe, f"record {payload[:20]!r} read where {expected[index : index + 1]!r} was due"
    return index


class SpoolModel(RuleBasedStateMachine):
    """Random appends, reads, acks, reopens and segment rolls against an in-memory list; subclasses
    run it with fsync on and through a file layer that injects disk faults between the steps."""

    fsync = False
    faults = False

    @initialize(segment_bytes=st.sampled_from([64, 300, 4096]), seed=st.integers(0, 2**16))
    def open(self, segment_bytes: int, seed: int) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.segment_bytes = segment_bytes
        self.ops: FileOps = FaultyFileOps(seed) if self.faults else OS_FILE_OPS
        self.writer = self._writer()
        self.reader = SpoolReader(self.folder)
        self.model: list[bytes] = []  # records of appends that returned (acknowledged), minus `lost`
        self.maybe: set[bytes] = set()  # records of appends that raised: may be read, need not be
        self.lost: set[bytes] = set()  # corrupted on their way to disk: must never be read
        self.lost_bytes = 0
        self.unclean = False  # a cut-back failed: torn bytes are left for the reader to skip
        self.failed: list[bytes] | None = None  # the batch a caller holds after a failed append
        self.acked = 0  # model index of the first unacknowledged record
        self.cursor = 0  # model index the next read starts at
        self.cursor_pos: Position = self.reader.acked
        self.counter = 0

    def _writer(self) -> SpoolWriter:
        return SpoolWriter(self.folder, segment_bytes=self.segment_bytes, fsync=self.fsync, file_ops=self.ops)

    def _append(self, batch: list[bytes]) -> None:
        corrupted = self.ops.corrupted if isinstance(self.ops, FaultyFileOps) else []
        before = len(corrupted)
        try:
            self.writer.append(batch)
        except SpoolError:
            assert self.faults, "append failed without an injected fault"
            self.maybe.update(batch)
            self.failed = batch
            return
        self.failed = None
        for payload in corrupted[before:]:
            self.lost.add(payload)
            self.lost_bytes += len(encode_record(payload))
        self.model.extend(p for p in batch if p not in self.lost)

    @rule(sizes=st.lists(st.integers(0, 200), min_size=1, max_size=5))
    def append(self, sizes: list[int]) -> None:
        batch = []
        for size in sizes:
            self.counter += 1
            batch.append(f"{self.counter}:".encode() + bytes(random.getrandbits(8) for _ in range(size)))
        self._append(batch)

    @precondition(lambda self: self.failed is not None)
    @rule()
    def retry_failed_batch(self) -> None:
        """What the collectors' sink does: hold the batch (unacknowledged) and append it again."""
        assert self.failed is not None
        self._append(self.failed)

    @precondition(lambda self: self.faults)
    @rule(kind=st.sampled_from(WRITE_FAULTS + OTHER_FAULTS))
    def inject(self, kind: str) -> None:
        assert isinstance(self.ops, FaultyFileOps)
        if kind == "truncate_fail":
            self.unclean = True
        self.ops.arm(kind)

    @rule(n=st.integers(1, 7))
    def read(self, n: int) -> None:
        records = self.reader.read(after=self.cursor_pos, max_records=n)
        self.cursor = _check_read([r.payload for r in records], self.model, self.cursor, self.maybe, self.lost)
        if records:
            self.cursor_pos = records[-1].end

    @rule()
    def ack(self) -> None:
        self.reader.ack(self.cursor_pos)
        self.acked = self.cursor

    @rule()
    def reopen_writer(self) -> None:
        self.writer.close()
        self.writer = self._writer()

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
        end = _check_read([r.payload for r in records], self.model, self.acked, self.maybe, self.lost)
        assert end == len(self.model), f"acknowledged records not readable: {self.model[end : end + 3]!r}"
        if self.reader.pending_bytes() == 0:
            assert self.acked == len(self.model)
        if not self.faults:
            assert (self.reader.pending_bytes() == 0) == (self.acked == len(self.model))
        # every corrupted record is passed over and counted, and nothing else unless a cut-back failed
        if self.unclean:
            assert self.reader.skipped_bytes >= self.lost_bytes
        else:
            assert self.reader.skipped_bytes == self.lost_bytes

    def teardown(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class SpoolModelFsync(SpoolModel):
    fsync = True


class SpoolModelFaults(SpoolModel):
    fsync = True
    faults = True


_MODEL_SETTINGS = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSpoolModel = SpoolModel.TestCase
TestSpoolModel.settings = _MODEL_SETTINGS
TestSpoolModelFsync = SpoolModelFsync.TestCase
TestSpoolModelFsync.settings = _MODEL_SETTINGS
TestSpoolModelDiskFaults = SpoolModelFaults.TestCase
TestSpoolModelDiskFaults.settings = settings(_MODEL_SETTINGS, max_examples=150)


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


# --- disk faults and power loss ----------------------------------------------------------------------


def test_failed_write_is_cut_back_and_the_retry_is_read(tmp_path: Path) -> None:
    ops = FaultyFileOps(seed=1)
    writer = SpoolWriter(tmp_path, file_ops=ops)
    writer.append([b"before"])
    ops.arm("short_write")
    with pytest.raises(SpoolFullError, match=r"No space left on device; the batch is not stored \(disk full\)"):
        writer.append([b"torn" * 50, b"x"])
    writer.append([b"torn" * 50, b"x"])  # the caller's retry, after the partial write was cut back
    writer.append([b"after"])
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in reader.read()] == [b"before", b"torn" * 50, b"x", b"after"]
    assert reader.skipped_bytes == 0 and writer.write_errors == 1
    assert writer.sealed_segments == 1  # part of the batch had been written: the retry goes to a new segment
    ops.arm("enospc_write")
    with pytest.raises(SpoolDiskFullError):
        writer.append([b"nothing written"])
    assert writer.sealed_segments == 1  # nothing written, disk full: the segment stays open


def test_a_reader_that_saw_part_of_a_failed_batch_does_not_lose_the_next_one(tmp_path: Path) -> None:
    """A reader may hand out (and acknowledge) the whole first record of a batch in the moment
    between a partial write and its cut-back; what is appended next must not land under its position."""
    ops = FaultyFileOps(seed=6)
    ops.rng.randint = lambda a, b: len(encode_record(b"first")) + 3  # type: ignore[method-assign]
    writer = SpoolWriter(tmp_path, file_ops=ops)
    reader = SpoolReader(tmp_path)
    seen: list[bytes] = []

    def read_now() -> None:
        for record in reader.read():
            seen.append(record.payload)
            reader.ack(record.end)

    ops.after_partial_write = read_now
    ops.arm("short_write")
    with pytest.raises(SpoolFullError):
        writer.append([b"first", b"second" * 20])
    assert seen == [b"first"]  # delivered before the cut-back
    writer.append([b"other"])  # the producer moved on to something else
    read_now()
    assert seen == [b"first", b"other"] and reader.skipped_bytes == 0


def test_failed_fsync_seals_the_segment_and_is_never_retried(tmp_path: Path) -> None:
    ops = FaultyFileOps(seed=2)
    writer = SpoolWriter(tmp_path, file_ops=ops)
    writer.append([b"durable"])
    ops.arm("fsync_fail")
    sealed = re.escape("cannot fsync seg-000000000000.log (segment sealed at byte 15)")
    with pytest.raises(SpoolWriteError, match=sealed) as info:
        writer.append([b"doubtful"])
    assert info.value.errno == errno.EIO and not isinstance(info.value, SpoolFullError)
    assert writer.sealed_segments == 1
    assert _newest_segment(tmp_path).read_bytes() == encode_record(b"durable")  # cut back, not fsynced again
    writer.append([b"doubtful"])
    assert [p.name for p in sorted(tmp_path.glob("seg-*.log"))] == ["seg-000000000000.log", "seg-000000000001.log"]
    assert [r.payload for r in SpoolReader(tmp_path).read()] == [b"durable", b"doubtful"]


def test_a_segment_that_cannot_be_cut_back_is_sealed_and_its_torn_tail_skipped_and_counted(tmp_path: Path) -> None:
    ops = FaultyFileOps(seed=3)
    writer = SpoolWriter(tmp_path, file_ops=ops)
    writer.append([b"a" * 20])
    ops.arm("eio_write", "truncate_fail")
    with pytest.raises(SpoolWriteError, match="Input/output error"):
        writer.append([b"b" * 100])
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in reader.read()] == [b"a" * 20]  # the torn batch is waited on, not read
    torn = len(_newest_segment(tmp_path).read_bytes()) - len(encode_record(b"a" * 20))
    writer.append([b"b" * 100])
    records = reader.read()
    assert [r.payload for r in records] == [b"a" * 20, b"b" * 100]
    assert reader.skipped_bytes == torn > 0
    reader.ack(records[-1].end)
    assert SpoolReader(tmp_path).skipped_bytes == torn  # persisted with the acknowledged position


def test_corruption_in_the_middle_of_a_segment_skips_only_the_bad_record(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path) as writer:
        for i in range(10):
            writer.append([f"record {i}".encode() * 5])
    segment = _newest_segment(tmp_path)
    data = bytearray(segment.read_bytes())
    size = len(encode_record(b"record 0" * 5))
    data[3 * size + 20] ^= 0x01  # a bit flipped in the payload of record 3
    segment.write_bytes(bytes(data))
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in reader.read()] == [f"record {i}".encode() * 5 for i in range(10) if i != 3]
    assert reader.skipped_bytes == size
    # The writer's recovery must not cut the intact records after the damage (it used to).
    SpoolWriter(tmp_path).close()
    assert len(segment.read_bytes()) == 10 * size


def test_a_corrupt_length_in_a_sealed_segment_is_passed_over(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path, segment_bytes=200) as writer:
        for i in range(6):
            writer.append([f"r{i}".encode() * 20])
    first = sorted(tmp_path.glob("seg-*.log"))[0]
    data = bytearray(first.read_bytes())
    data[0:4] = (10**6).to_bytes(4, "little")  # the first record now claims a megabyte
    first.write_bytes(bytes(data))
    reader = SpoolReader(tmp_path)
    assert [r.payload for r in reader.read()] == [f"r{i}".encode() * 20 for i in range(1, 6)]
    assert reader.skipped_bytes == len(encode_record(b"r0" * 20))


def test_disk_full_on_segment_creation_refuses_then_recovers(tmp_path: Path) -> None:
    ops = FaultyFileOps(seed=4)
    writer = SpoolWriter(tmp_path, segment_bytes=100, file_ops=ops)
    writer.append([b"x" * 80])
    ops.arm("create_fail")
    with pytest.raises(SpoolDiskFullError, match=re.escape("cannot create seg-000000000001.log")):
        writer.append([b"y" * 80])  # needs a new segment
    ops.arm("dir_fsync_fail")
    with pytest.raises(SpoolWriteError, match="cannot fsync the folder entry"):
        writer.append([b"y" * 80])
    writer.append([b"y" * 80])
    assert [r.payload for r in SpoolReader(tmp_path).read()] == [b"x" * 80, b"y" * 80]


def _crash_round(folder: Path, rng: random.Random, state: dict[str, Any]) -> None:
    """Append with random faults until the simulated power goes off, then cut power."""
    ops = FaultyFileOps(rng.randrange(1 << 30))
    ops.power_off_after = rng.randint(0, 80)
    writer = None
    try:
        writer = SpoolWriter(folder, segment_bytes=rng.choice([64, 300, 4096]), file_ops=ops)
        held: list[bytes] | None = None
        while True:
            if held is None:
                state["n"] += 1
                sizes = [rng.randint(0, 150) for _ in range(rng.randint(1, 4))]
                held = [f"{state['n']}.{i}:".encode() + rng.randbytes(size) for i, size in enumerate(sizes)]
            if rng.random() < 0.25:
                ops.arm(rng.choice(WRITE_FAULTS + OTHER_FAULTS))
            before = len(ops.corrupted)
            try:
                writer.append(held)
            except SpoolError:
                state["maybe"].update(held)
                continue  # hold the batch and retry it, as the collectors do
            finally:
                state["maybe"].update(held)  # until it returned, a power cut may leave some of it
            state["lost"].update(ops.corrupted[before:])
            state["acked"].extend(p for p in held if p not in state["lost"])
            held = None
    except PowerLoss:
        pass
    finally:
        if writer is not None:
            writer.close()  # only releases the lock and descriptors: nothing is written or synced
    state["lost_on_power_cut"] += ops.power_loss()["bytes"]


def test_power_loss_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    """Crash consistency: after each simulated power cut the disk holds only what was fsynced (and
    maybe some garbled part of the rest); every append that returned must still be read, in order."""
    rng = random.Random(20261202)
    for folder_number in range(12):
        folder = tmp_path / f"spool{folder_number}"
        state: dict[str, Any] = {"n": 0, "maybe": set(), "lost": set(), "acked": [], "lost_on_power_cut": 0}
        for _ in range(6):
            _crash_round(folder, rng, state)
            SpoolWriter(folder).close()  # the next start: recovery on a plain disk
            payloads = [r.payload for r in SpoolReader(folder).read(max_records=10**6, max_bytes=1 << 40)]
            end = _check_read(payloads, state["acked"], 0, state["maybe"], state["lost"])
            assert end == len(state["acked"]), (
                f"{len(state['acked']) - end} acknowledged records lost after a power cut, "
                f"e.g. {state['acked'][end][:20]!r}"
            )
        assert state["acked"] and state["lost_on_power_cut"] > 0  # the cuts really threw data away


def test_ack_survives_a_torn_slot_and_reads_the_old_format(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path) as writer:
        for i in range(5):
            writer.append([f"r{i}".encode()])
    reader = SpoolReader(tmp_path)
    records = reader.read()
    reader.ack(records[1].end)  # the second slot
    reader.ack(records[3].end)  # the first slot
    ack_file = tmp_path / "ack.json"
    assert ack_file.stat().st_size == 512
    assert SpoolReader(tmp_path).acked == records[3].end
    data = bytearray(ack_file.read_bytes())
    data[0:10] = b"\xff" * 10  # the newest write torn (power cut): the previous position holds
    ack_file.write_bytes(bytes(data))
    assert SpoolReader(tmp_path).acked == records[1].end
    data[256:266] = b"\xff" * 10  # both torn: start over from the oldest segment (duplicates, no loss)
    ack_file.write_bytes(bytes(data))
    assert [r.payload for r in SpoolReader(tmp_path).read()] == [f"r{i}".encode() for i in range(5)]
    ack_file.write_text(json.dumps({"segment": 0, "offset": records[2].end.offset}))  # the old format
    old = SpoolReader(tmp_path)
    assert [r.payload for r in old.read()] == [b"r3", b"r4"]
    old.ack(records[3].end)
    assert [r.payload for r in SpoolReader(tmp_path).read()] == [b"r4"]
