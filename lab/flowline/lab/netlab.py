"""A three-zone network lab on real isolation: network namespaces, veth links and nftables rules.

Four namespaces per lab, named ``<prefix>-<random suffix>-<zone>`` so that concurrent labs (a test
run and a person's lab) never collide:

    ot  10.77.1.2 ──┐                     ┌── 10.77.2.2  dmz
                    └─ fw (router and firewall, nftables) ─┘
                                 └── 10.77.3.2  it

Every zone has one interface (``lan0``) towards ``fw``, whose interfaces are named after the
zones. The addresses exist only inside these namespaces (each lab has its own copies), IPv6 is
off, and the firewall's rules are written here, as code (`NetLab.ruleset`): default deny, OT may
open only the relay port in the DMZ, the DMZ only the historian's HTTP port in IT, nothing may open
a connection into OT, and nothing may talk to the firewall itself. Named counters count what each
rule passed or dropped; tests read them with `NetLab.counters`.

Diode mode replaces the relay rule by a UDP rule to the diode port, with ``numgen random mod 100 <
N drop`` as the injected loss, and makes the OT link one-way in the link itself: a netdev egress
hook on the firewall's ``ot`` interface drops every frame towards OT (ARP replies too, so OT uses
a static neighbour entry) and counts it in ``reverse_dropped``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from flowline.core.errors import FlowlineError

T = TypeVar("T")
Mode = Literal["tcp", "diode"]

ZONES = ("ot", "dmz", "it")
_SUBNET = {"ot": 1, "dmz": 2, "it": 3}
RELAY_PORT = 7443
DIODE_PORT = 7444
HISTORIAN_PORT = 8086
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class LabError(FlowlineError):
    """The lab cannot be built or used here (not root, tools missing, a command failed)."""


def _run(*cmd: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{cmd[0]} is not installed: apt-get install iproute2 nftables") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(cmd[:6])}… failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def check_host() -> None:
    """Raise a `LabError` saying what is missing to build a lab on this machine."""
    if os.geteuid() != 0:
        raise LabError("the network lab creates namespaces and firewall rules: run it as root")
    missing = [
        tool for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("ss", "iproute2")) if not shutil.which(tool)
    ]
    if missing:
        raise LabError(f"missing {', '.join(missing)}: apt-get install iproute2 nftables")


def address(zone: str) -> str:
    """The zone's own address (the firewall is .1 on the same /24)."""
    return f"10.77.{_SUBNET[zone]}.2"


def gateway_address(zone: str) -> str:
    return f"10.77.{_SUBNET[zone]}.1"


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(namespace: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has joined ``namespace``'s network stack (sockets it opens live there).

    A network namespace is per thread, so the caller's own sockets stay where they were.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"{NETNS_DIR}/{namespace}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass(frozen=True)
class Listener:
    proto: str  # tcp or udp
    local: str  # address:port as ss prints it

    @property
    def loopback(self) -> bool:
        host = self.local.rsplit(":", 1)[0].strip("[]").split("%")[0]
        return host.startswith("127.") or host == "::1"


class NetLab:
    """One lab: its namespaces, links and rules. `up` builds it (undoing everything on failure), `down` removes it."""

    def __init__(
        self, prefix: str = "flowline", mode: Mode = "tcp", loss_pct: int = 0, suffix: str | None = None
    ) -> None:
        if not 0 <= loss_pct <= 100:
            raise ValueError(f"loss must be 0..100 %, got {loss_pct}")
        self.prefix = prefix
        self.suffix = suffix or secrets.token_hex(3)
        self.mode: Mode = mode
        self.loss_pct = loss_pct
        self.namespaces = {zone: f"{prefix}-{self.suffix}-{zone}" for zone in (*ZONES, "fw")}

    # --- building ---------------------------------------------------------------------------------

    def ruleset(self) -> str:
        """The firewall's nftables rules (the whole policy of the lab: read this to review it)."""
        ot, dmz, it = (address(z) for z in ZONES)
        diode = self.mode == "diode"
        counters = [
            "relay_allowed", "historian_allowed", "diode_allowed", "diode_loss_dropped",
            "into_ot_dropped", "ot_denied", "dmz_denied", "it_denied", "firewall_denied",
        ]  # fmt: skip
        lines = ["table inet flowline_lab {"]
        lines += [f"  counter {name} {{ }}" for name in counters]
        lines += [
            "  chain loss {",
            f'    numgen random mod 100 < {self.loss_pct} counter name "diode_loss_dropped" drop',
            '    counter name "diode_allowed" accept',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy drop;",
        ]
        if diode:
            lines.append(
                f'    iifname "ot" oifname "dmz" ip saddr {ot} ip daddr {dmz} udp dport {DIODE_PORT} jump loss'
            )
        lines += [
            "    ct state established,related accept",
            '    oifname "ot" counter name "into_ot_dropped" drop',
        ]
        if not diode:
            lines.append(
                f'    iifname "ot" oifname "dmz" ip saddr {ot} ip daddr {dmz} tcp dport {RELAY_PORT} ct state new'
                ' counter name "relay_allowed" accept'
            )
        lines += [
            f'    iifname "dmz" oifname "it" ip saddr {dmz} ip daddr {it} tcp dport {HISTORIAN_PORT} ct state new'
            ' counter name "historian_allowed" accept',
            '    iifname "ot" counter name "ot_denied" drop',
            '    iifname "dmz" counter name "dmz_denied" drop',
            '    iifname "it" counter name "it_denied" drop',
            "  }",
            "  chain input {",
            "    type filter hook input priority filter; policy drop;",
            '    iifname "lo" accept',
            '    counter name "firewall_denied" drop',
            "  }",
            "}",
        ]
        if diode:
            lines += [
                "table netdev flowline_diode {",
                "  counter reverse_dropped { }",
                "  chain one_way {",
                '    type filter hook egress device "ot" priority filter;',
                '    counter name "reverse_dropped" drop',
                "  }",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def up(self) -> NetLab:
        check_host()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        fw = self.namespaces["fw"]
        for ns in self.namespaces.values():
            _run("ip", "netns", "add", ns)
            # IPv4 only, set before any interface exists so none gets an IPv6 link-local address.
            for key in ("all", "default"):
                _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", fw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for zone in ZONES:
            ns = self.namespaces[zone]
            _run("ip", "-n", fw, "link", "add", zone, "type", "veth", "peer", "name", "lan0", "netns", ns)
            _run("ip", "-n", fw, "addr", "add", f"{gateway_address(zone)}/24", "dev", zone)
            _run("ip", "-n", ns, "addr", "add", f"{address(zone)}/24", "dev", "lan0")
            _run("ip", "-n", fw, "link", "set", zone, "up")
            _run("ip", "-n", ns, "link", "set", "lan0", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", gateway_address(zone))
        _run("ip", "netns", "exec", fw, "nft", "-f", "-", stdin=self.ruleset())
        if self.mode == "diode":
            # No ARP reply can reach OT: OT knows its next hop's MAC statically, like a real diode's sender.
            link = json.loads(_run("ip", "-n", fw, "-j", "link", "show", "ot"))[0]
            _run("ip", "-n", self.namespaces["ot"], "neigh", "replace", gateway_address("ot"), "lladdr",
                 link["address"], "dev", "lan0", "nud", "permanent")  # fmt: skip

    def down(self) -> None:
        """Stop whatever still runs in this lab's namespaces, then delete them (with their links and rules)."""
        for ns in self.namespaces.values():
            if not os.path.exists(f"{NETNS_DIR}/{ns}"):
                continue
            self._kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    @staticmethod
    def _kill_namespace_processes(ns: str) -> None:
        # The names are unique to this lab, so every process in them is one this lab started.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for p in _pids(ns)]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while pids and _pids(ns) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _pids(ns):
                return

    def exists(self) -> dict[str, bool]:
        return {zone: os.path.exists(f"{NETNS_DIR}/{ns}") for zone, ns in self.namespaces.items()}

    def __enter__(self) -> NetLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- using -------------------------------------------------------------------------------------

    def exec_prefix(self, zone: str) -> list[str]:
        """Prefix a command with this to run it in ``zone`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespaces[zone]]

    def run_in(self, zone: str, fn: Callable[[], T]) -> T:
        return in_netns(self.namespaces[zone], fn)

    def set_loss(self, pct: int) -> None:
        """Change the injected loss on the OT -> DMZ diode flow (atomically: one nft transaction)."""
        self.loss_pct = pct
        script = (
            "flush chain inet flowline_lab loss\n"
            f'add rule inet flowline_lab loss numgen random mod 100 < {pct} counter name "diode_loss_dropped" drop\n'
            'add rule inet flowline_lab loss counter name "diode_allowed" accept\n'
        )
        _run("ip", "netns", "exec", self.namespaces["fw"], "nft", "-f", "-", stdin=script)

    def counters(self) -> dict[str, int]:
        """Packets counted by each named counter of the firewall."""
        out = json.loads(_run("ip", "netns", "exec", self.namespaces["fw"], "nft", "-j", "list", "counters"))
        return {
            item["counter"]["name"]: int(item["counter"]["packets"])
            for item in out.get("nftables", [])
            if "counter" in item
        }

    def rx_packets(self, zone: str) -> int:
        """Packets the zone's own interface has received (read from the kernel, not assumed)."""
        link = json.loads(_run("ip", "-n", self.namespaces[zone], "-j", "-s", "link", "show", "lan0"))[0]
        return int(link["stats64"]["rx"]["packets"])

    def listeners(self, zone: str) -> list[Listener]:
        """Every listening TCP socket and bound UDP socket in the zone, as ``ss`` reports them."""
        text = _run("ip", "netns", "exec", self.namespaces[zone], "ss", "-H", "-tuln")
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 5:
                out.append(Listener(parts[0], parts[4]))
        return out


def _pids(ns: str) -> list[str]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return done.stdout.split()
