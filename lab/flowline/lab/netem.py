"""Link simulation for rehearsing the relay (tests, benchmarks, site acceptance runs).

`LossyUdpProxy` forwards datagrams to a target, dropping each with probability ``loss`` and
counting what it dropped (diode mode); `CuttableTcpProxy` forwards TCP and can cut the link.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable
from typing import Self

Reader = Callable[[bytes], None]


class LossyUdpProxy:
    def __init__(self, target: tuple[str, int], loss: float, seed: int | None = None) -> None:
        self.target = target
        self.loss = loss
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.forwarded = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-udp", daemon=True)

    def start(self) -> LossyUdpProxy:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            self.out.sendto(data, self.target)
            self.forwarded += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        self.out.close()


class CuttableTcpProxy:
    """A TCP forwarder whose link can be cut: `cut` drops every open connection at once.

    A subclass can read the bytes as they pass (`_readers`); they are forwarded unchanged.
    """

    thread_name = "tcp-proxy"
    # Reads from the far end time out after this many idle seconds (the connect timeout, kept);
    # None waits for as long as the connection is open.
    upstream_timeout: float | None = 5

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self.accepted = 0  # connections forwarded: a reconnect after a cut shows up here
        self.severed = 0  # connections a cut really dropped (a cut while nothing is connected drops none)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=self.thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the far end is down: so is the link
                continue
            upstream.settimeout(self.upstream_timeout)
            to_upstream, from_upstream = self._readers()
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b, read in ((client, upstream, to_upstream), (upstream, client, from_upstream)):
                threading.Thread(target=self._pump, args=(a, b, read), daemon=True).start()

    def _readers(self) -> tuple[Reader | None, Reader | None]:
        """Per new connection: what reads the bytes going to the far end and those coming back."""
        return None, None

    def _pump(self, src: socket.socket, dst: socket.socket, read: Reader | None = None) -> None:
        try:
            while data := src.recv(1 << 16):
                if read is not None:
                    read(data)  # first: the reader can never see a reply before what it answers
                dst.sendall(data)
        except OSError:
            return  # one side closed or the link was cut: the connection ends, both sockets close below
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            # A connection that ended by itself is no longer open: a later cut must not count it.
            with self._lock:
                self._conns = [c for c in self._conns if c is not src and c is not dst]
            for s in (src, dst):
                s.close()  # both pumps end after the shutdowns; closing twice is harmless

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2

    def cut(self) -> int:
        """Drop every open connection; the number of connections dropped."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.cuts += 1
        self.severed += len(conns) // 2
        return len(conns) // 2

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
        self.cut()
