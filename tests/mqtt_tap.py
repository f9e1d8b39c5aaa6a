"""A TCP proxy between an MQTT client and the broker that reads the packets as they pass (plain MQTT).

It is the ledger of the collector's side of the broker: which QoS 1 messages the broker delivered
(and how often) and which ones the collector acknowledged with PUBACK. After a broker ``kill -9``
that tells apart what the broker lost (it acknowledged a publisher, then forgot the message before
delivering it) from what we lost (a message we acknowledged that never reached InfluxDB: must be
none). Bytes are forwarded unchanged; parsing only reads a copy.
"""

from __future__ import annotations

from collections import Counter

from flowline.lab.netem import CuttableTcpProxy, Reader

Message = tuple[str, bytes]  # (topic, payload): unique per message in the tests' sequences

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4


def _varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at ``pos``: (value, next position), or None if incomplete."""
    value = shift = 0
    for i in range(4):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("malformed MQTT remaining length")


class _Connection:
    """One client connection: the broker's packet ids still waiting for the client's PUBACK."""

    def __init__(self) -> None:
        self.level = 4  # MQTT 3.1.1 unless CONNECT says 5
        self.unacked: dict[int, Message] = {}


class MqttTap(CuttableTcpProxy):
    thread_name = "mqtt-tap"
    upstream_timeout = None  # an idle MQTT connection is kept alive by the client's PINGREQs, not by us

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.sessions_resumed = 0  # CONNACKs with "session present": the broker kept our session
        self.deliveries: Counter[Message] = Counter()  # QoS 1 PUBLISHes from the broker to the client
        self.acked: set[Message] = set()  # those the client acknowledged

    @property
    def connections(self) -> int:
        return self.accepted

    def _readers(self) -> tuple[Reader, Reader]:
        conn = _Connection()
        return self._reader(conn, from_client=True), self._reader(conn, from_client=False)

    def _reader(self, conn: _Connection, from_client: bool) -> Reader:
        buf = bytearray()

        def read(data: bytes) -> None:
            buf.extend(data)
            self._parse(buf, conn, from_client)

        return read

    def _parse(self, buf: bytearray, conn: _Connection, from_client: bool) -> None:
        """Consume every complete packet at the front of ``buf``."""
        while len(buf) >= 2:
            header = _varint(buf, 1)
            if header is None:
                return
            length, start = header
            if len(buf) < start + length:
                return
            kind, flags, body = buf[0] >> 4, buf[0] & 0x0F, bytes(buf[start : start + length])
            del buf[: start + length]
            if kind == CONNECT and from_client:
                name_len = int.from_bytes(body[:2], "big")
                conn.level = body[2 + name_len]
            elif kind == CONNACK and not from_client and body[0] & 1:
                with self._lock:
                    self.sessions_resumed += 1
            elif kind == PUBLISH and not from_client and (flags >> 1) & 3 == 1:
                topic_len = int.from_bytes(body[:2], "big")
                topic = body[2 : 2 + topic_len].decode()
                packet_id = int.from_bytes(body[2 + topic_len : 4 + topic_len], "big")
                pos = 4 + topic_len
                if conn.level == 5:
                    props = _varint(body, pos)
                    assert props is not None
                    pos = props[1] + props[0]
                message = (topic, body[pos:])
                with self._lock:
                    self.deliveries[message] += 1
                    conn.unacked[packet_id] = message
            elif kind == PUBACK and from_client:
                packet_id = int.from_bytes(body[:2], "big")
                with self._lock:
                    if packet_id in conn.unacked:
                        self.acked.add(conn.unacked.pop(packet_id))

    def redelivered(self) -> int:
        """Deliveries beyond the first of each message (what the collector may have spooled twice)."""
        with self._lock:
            return sum(n - 1 for n in self.deliveries.values())
