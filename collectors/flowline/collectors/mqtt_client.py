"""paho-mqtt client with a fast receive path for the packets that matter: QoS 0/1 PUBLISH.

paho 2.x handles each incoming packet with several small reads, a ``select``, an ``MQTTMessage``,
two locks and a callback, and queues each PUBACK with a wake-up write of its own: about 30,000
messages/s on one core here, a quarter of what Mosquitto delivers. This client keeps paho for
everything that is rare or stateful (connect, subscribe, keep-alive, TLS, reconnect with back-off,
QoS 2) and does the common case itself:

* the socket is read 64 KiB at a time into one buffer;
* every complete QoS 0/1 PUBLISH at the front of the buffer is split out here and handed to
  ``on_publish_batch`` in one call (a batch is what one read brought, so up to ~1,000 messages);
* any other packet is handed to paho's own parser, but only once it is complete in the buffer, so
  paho never holds a half-read packet and the two parsers cannot interleave;
* ``ack_many`` sends the PUBACKs of a whole batch as one write, in the order the messages came, as
  MQTT requires.

It overrides paho's private ``loop_read``, ``_sock_recv`` and ``_sock_close`` and calls its
``_packet_read``/``_packet_queue`` (checked against paho-mqtt 2.1-2.2; tests/test_mqtt_client.py
pins the behaviour).
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK = 65536
_PUBLISH, _PUBACK = 0x30, 0x40
_QOS_HIGH_BIT = 0x04  # set for QoS 2 and for the invalid QoS 3: both are paho's to handle
_PUBACK_PACKET = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id


class Publish(NamedTuple):
    """One incoming PUBLISH: ``mid`` is 0 for QoS 0 (nothing to acknowledge)."""

    topic: str
    payload: bytes
    qos: int
    mid: int


def _varint(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at ``pos``: (value, position after it), None if incomplete or malformed."""
    value, shift = 0, 0
    while pos < end and shift <= 21:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return None


def split_publishes(buf: bytearray, pos: int, mqtt5: bool) -> tuple[list[Publish], int]:
    """Complete QoS 0/1 PUBLISH packets from ``pos``; stops at anything else or a partial packet.

    Returns the messages and the position of the first byte not consumed. A packet this parser
    does not take (another type, QoS 2, a malformed header) is left for paho, which reports errors.
    """
    out: list[Publish] = []
    end = len(buf)
    while pos < end:
        header = buf[pos]
        if header & 0xF0 != _PUBLISH or header & _QOS_HIGH_BIT:
            break
        length = _varint(buf, pos + 1, end)
        if length is None:
            break
        remaining, body = length
        stop = body + remaining
        if stop > end or remaining < 2:
            break
        topic_end = body + 2 + ((buf[body] << 8) | buf[body + 1])
        qos = (header >> 1) & 0x03
        payload_start = topic_end + 2 if qos else topic_end
        if payload_start > stop:
            break
        mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
        if mqtt5:  # properties (none we need: topic aliases are not enabled by this client)
            props = _varint(buf, payload_start, stop)
            if props is None or props[1] + props[0] > stop:
                break
            payload_start = props[1] + props[0]
        # An ill-formed UTF-8 topic is still delivered (and rejected as unknown by the collector).
        topic = buf[body + 2 : topic_end].decode("utf-8", "replace")
        out.append(Publish(topic, bytes(buf[payload_start:stop]), qos, mid))
        pos = stop
    return out, pos


def packet_complete(buf: bytearray, pos: int) -> bool:
    """True when a whole MQTT packet starts at ``pos`` (or its header is malformed: paho says so)."""
    length = _varint(buf, pos + 1, len(buf))
    if length is None:
        return len(buf) - pos > 5  # more than 4 length bytes can never become valid
    return length[1] + length[0] <= len(buf)


def puback_packets(mids: list[int]) -> bytes:
    return b"".join([_PUBACK_PACKET.pack(_PUBACK, 2, mid) for mid in mids])


class FastClient(mqtt.Client):
    """A paho-mqtt client whose QoS 0/1 messages arrive in batches on ``on_publish_batch``.

    Set ``on_publish_batch`` before connecting; it runs on paho's network thread. QoS 2 messages
    keep paho's ``on_message`` path. Acknowledge QoS 1 messages with ``ack_many`` (any thread).
    """

    on_publish_batch: Callable[[list[Publish]], None] | None = None
    # paho only logs a TLS failure at debug level and reports "Unspecified error": keep it for the collector
    tls_error: ssl.SSLError | None = None
    # paho swallows why a connection attempt failed (refused, unreachable, DNS): keep it to report
    connect_error: OSError | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rpos = 0

    def reconnect(self) -> MQTTErrorCode:
        self._rbuf, self._rpos = bytearray(), 0  # bytes of a dead connection must never reach the next one
        try:
            return super().reconnect()
        except ssl.SSLError as exc:  # handshake refused (e.g. TLS 1.2 without a client certificate)
            self.tls_error = exc
            raise
        except OSError as exc:
            self.connect_error = exc
            raise

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages (in the order given) with one queued write."""
        if mids and self._sock is not None:
            self._packet_queue(_PUBACK, puback_packets(mids), 0, 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        try:
            data = super()._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as exc:  # includes TLS alerts, e.g. "certificate required" on the first read
            if isinstance(exc, ssl.SSLError):
                self.tls_error = exc
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        self._rbuf += data
        rc = self._drain_buffer()
        if self._sock is not None:  # paho may have closed the socket (and reset the buffer) on an error
            del self._rbuf[: self._rpos]
            self._rpos = 0
        return rc

    def _drain_buffer(self) -> MQTTErrorCode:
        mqtt5 = self._protocol == mqtt.MQTTv5
        handler = self.on_publish_batch
        while self._rpos < len(self._rbuf):
            if handler is not None:  # without a batch handler every packet goes through paho
                batch, self._rpos = split_publishes(self._rbuf, self._rpos, mqtt5)
                if batch:
                    handler(batch)
            if self._rpos >= len(self._rbuf) or not packet_complete(self._rbuf, self._rpos):
                break
            rc = self._packet_read()  # one complete non-fast packet, served from the buffer
            if rc > 0:
                return self._loop_rc_handle(rc)
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho's parser reads from the buffer only (``loop_read`` made sure the packet is complete)."""
        start = self._rpos
        if start >= len(self._rbuf):
            raise BlockingIOError
        chunk = bytes(self._rbuf[start : start + bufsize])
        self._rpos = start + len(chunk)
        return chunk

    def _sock_close(self) -> None:
        super()._sock_close()
        self._rbuf, self._rpos = bytearray(), 0
