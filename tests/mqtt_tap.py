"""A TCP proxy between an MQTT client and the broker that reads the packets as they pass (plain MQTT).

It is the ledger of the collector's side of the broker: which QoS 1 messages the broker delivered
(and how often) and which ones the collector acknowledged with PUBACK. After a broker ``kill -9``
that tells apart what the broker lost (it acknowledged a publisher, then forgot the message before
delivering it) from what we lost (a message we acknowledged that never reached InfluxDB: must be
none). Bytes are forwarded unchanged; parsing only reads a copy.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter

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


class MqttTap:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.sessions_resumed = 0  # CONNACKs with "session present": the broker kept our session
        self.deliveries: Counter[Message] = Counter()  # QoS 1 PUBLISHes from the broker to the client
        self.acked: set[Message] = set()  # those the client acknowledged
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="mqtt-tap", daemon=True)

    def start(self) -> MqttTap:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                broker = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the broker is down: so is the client's connection
                continue
            broker.settimeout(None)
            conn = _Connection()
            with self._lock:
                self.connections += 1
                self._socks += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker, conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: _Connection, from_client: bool) -> None:
        buf = bytearray()
        try:
            while data := src.recv(1 << 16):
                buf += data
                self._parse(buf, conn, from_client)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._socks = [s for s in self._socks if s is not src and s is not dst]
            for sock in (src, dst):
                sock.close()

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
