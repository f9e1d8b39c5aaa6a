"""``flowline certs``: the certificates a site needs, named as docker/compose.yaml's secrets.

- ``ca``: the relay CA (``relay_ca.pem``, ``relay_ca.key``). Keep the key off the Docker host.
- ``gateway``: the DMZ gateway's server certificate (``dmz_gateway_cert.pem``/``_key.pem``): SAN DNS
  names (and IPs) the OT sender dials, extended key usage serverAuth.
- ``sender``: an OT sender's client certificate (``ot_sender_cert.pem``/``_key.pem``): CN = the
  sender id (the gateway checks it against the batches' sender), extended key usage clientAuth.
- ``opcua-client``: the OPC UA collector's application instance certificate
  (``opcua_client_cert.pem``/``_key.pem``, and ``.der`` for servers that import DER): SAN URI =
  ``security.application_uri`` (default ``urn:flowline:collector``), the key usages OPC UA Part 6
  asks of an application certificate (digitalSignature, nonRepudiation, keyEncipherment,
  dataEncipherment), extended key usages clientAuth and serverAuth. Self-signed unless a CA is given.

Keys are RSA (3072 bits by default; 2048 is the least Basic256Sha256 accepts), written unencrypted
with mode 0600 for the services that read them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from flowline.lab.pki import CertFiles, CertificateAuthority, issue_certificate

DEFAULT_URI = "urn:flowline:collector"


def _key_size(value: int) -> int:
    if value < 2048:
        raise click.BadParameter("at least 2048 bits (OPC UA Basic256Sha256 and TLS 1.3 need it)")
    return value


out_option = click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write into."
)
ca_options = [
    click.option("--ca-cert", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="The CA certificate (PEM), e.g. relay_ca.pem."),
    click.option("--ca-key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="The CA's private key (PEM, unencrypted)."),
]  # fmt: skip
key_size_option = click.option(
    "--key-size", default=3072, show_default=True, callback=lambda _c, _p, v: _key_size(v), help="RSA key bits."
)
days_option = click.option("--days", default=825, show_default=True, help="Validity in days.")


F = TypeVar("F", bound=Callable[..., None])


def _with_ca(function: F) -> F:
    for option in reversed(ca_options):
        function = option(function)
    return function


def _load_ca(ca_cert: Path, ca_key: Path, out: Path) -> CertificateAuthority:
    try:
        return CertificateAuthority.load(ca_cert, ca_key, out)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(f"cannot use the CA {ca_cert} / {ca_key}: {exc}") from exc


def _rename(files: CertFiles, out: Path, name: str, der: bool = False) -> list[Path]:
    """``<stem>.pem/.key/.der`` -> ``<name>_cert.pem``, ``<name>_key.pem`` (and ``<name>_cert.der``)."""
    written = [files.cert.replace(out / f"{name}_cert.pem"), files.key.replace(out / f"{name}_key.pem")]
    if der:
        written.append(files.der.replace(out / f"{name}_cert.der"))
    else:
        files.der.unlink()
    return written


def _report(paths: list[Path], note: str = "") -> None:
    for path in paths:
        click.echo(f"wrote {path}")
    if note:
        click.echo(note)


@click.group()
def certs() -> None:
    """Make the relay CA, gateway and sender certificates and the OPC UA client certificate."""


@certs.command()
@out_option
@click.option("--name", default="Flowline relay CA", show_default=True, help="The CA's common name.")
@click.option("--days", default=3650, show_default=True, help="Validity in days.")
@key_size_option
def ca(out: Path, name: str, days: int, key_size: int) -> None:
    """Create the relay CA: relay_ca.pem (give it to both relay sides) and relay_ca.key (keep it offline).

    \b
    Example:
      flowline certs ca --out ~/flowline-ca && cp ~/flowline-ca/relay_ca.pem docker/secrets/
    """
    authority = CertificateAuthority(out, name=name, key_size=key_size, days=days, stem="relay_ca")
    authority.files.der.unlink()
    _report([authority.files.cert, authority.files.key], f"keep {authority.files.key} off the Docker host")


@certs.command()
@_with_ca
@out_option
@click.option("--host", "hosts", multiple=True, required=True,
              help="DNS name the OT sender dials (relay.ot.gateway_host or tls.server_name); repeatable.")  # fmt: skip
@click.option("--ip", "ips", multiple=True, help="IP address the OT sender may dial instead; repeatable.")
@days_option
@key_size_option
def gateway(
    ca_cert: Path, ca_key: Path, out: Path, hosts: tuple[str, ...], ips: tuple[str, ...], days: int, key_size: int
) -> None:
    """The DMZ gateway's server certificate, signed by the relay CA.

    \b
    Example:
      flowline certs gateway --ca-cert relay_ca.pem --ca-key ~/flowline-ca/relay_ca.key \\
        --host dmz-gateway --out docker/secrets
    """
    authority = _load_ca(ca_cert, ca_key, out)
    files = authority.issue(hosts[0], "dmz_gateway", dns=hosts, ips=ips, server=True, client=False,
                            days=days, key_size=key_size)  # fmt: skip
    _report(_rename(files, out, "dmz_gateway"))


@certs.command()
@_with_ca
@out_option
@click.option("--sender-id", required=True, help="relay.ot.sender_id: the certificate's CN, checked by the gateway.")
@days_option
@key_size_option
def sender(ca_cert: Path, ca_key: Path, out: Path, sender_id: str, days: int, key_size: int) -> None:
    """An OT sender's client certificate, signed by the relay CA.

    \b
    Example:
      flowline certs sender --ca-cert relay_ca.pem --ca-key ~/flowline-ca/relay_ca.key \\
        --sender-id ot-north-1 --out docker/secrets
    """
    authority = _load_ca(ca_cert, ca_key, out)
    files = authority.issue(sender_id, "ot_sender", dns=(sender_id,), ips=(), server=False, client=True,
                            days=days, key_size=key_size)  # fmt: skip
    _report(_rename(files, out, "ot_sender"))


@certs.command("opcua-client")
@out_option
@click.option("--uri", default=DEFAULT_URI, show_default=True,
              help="SAN URI: collectors.opcua.servers.<name>.security.application_uri.")  # fmt: skip
@click.option("--host", "hosts", multiple=True, help="DNS name of the collector host (default: this host); repeatable.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Sign with this CA (PEM) instead of self-signing (then trust the CA on the server).")  # fmt: skip
@click.option("--ca-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The CA's key (PEM).")
@click.option("--days", default=3650, show_default=True, help="Validity in days.")
@key_size_option
def opcua_client(
    out: Path, uri: str, hosts: tuple[str, ...], ca_cert: Path | None, ca_key: Path | None, days: int, key_size: int
) -> None:
    """The OPC UA collector's application instance certificate (self-signed unless --ca-cert is given).

    Trust the .der (or .pem) on the plant's OPC UA server, then point security.cert_file and key_file
    at opcua_client_cert.pem and opcua_client_key.pem.

    \b
    Example:
      flowline certs opcua-client --out docker/secrets
    """
    if (ca_cert is None) != (ca_key is None):
        raise click.UsageError("give both --ca-cert and --ca-key, or neither (self-signed)")
    names = hosts or (socket.gethostname(),)
    authority = _load_ca(ca_cert, ca_key, out) if ca_cert is not None and ca_key is not None else None
    files = issue_certificate(out, authority, "Flowline OPC UA collector", "opcua_client", dns=names, ips=(),
                              uri=uri, server=True, client=True, days=days, key_size=key_size)  # fmt: skip
    note = f"SAN URI {uri}: trust opcua_client_cert.der (or its CA) on the OPC UA server"
    if uri != DEFAULT_URI:
        note += f", and set security.application_uri: {uri}"
    _report(_rename(files, out, "opcua_client", der=True), note)
