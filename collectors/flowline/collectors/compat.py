"""Start-up check of the library internals the collectors' fast paths rely on.

The MQTT fast receive path (`mqtt_client.FastClient`) overrides and calls private parts of
paho-mqtt, and the OPC UA collector routes notifications through asyncua's private
``Subscription._deliver``. Both are pinned to the versions the tests ran with (pyproject), but a
host may still end up with another version (a distribution package, a hand install). Then this
check fails loudly at start, naming the library, its version and what is missing, instead of the
collector misbehaving quietly later.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from flowline.core.errors import DependencyError

# paho-mqtt: class members FastClient overrides or calls, and instance state it reads.
PAHO_CLASS_MEMBERS = ("loop_read", "_sock_recv", "_sock_close", "_packet_read", "_packet_queue")
PAHO_INSTANCE_STATE = ("_sock", "_loop_rc_handle", "_msgtime_mutex", "_last_bytes_received", "_protocol")
ASYNCUA_SUBSCRIPTION_MEMBERS = ("_deliver",)


def _installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _refuse(dist: str, missing: list[str], what: str) -> DependencyError:
    return DependencyError(
        f"{dist} {_installed(dist)} lacks {', '.join(missing)}, which the {what} relies on; "
        f"install the version range flowline-plant-collectors declares (see its pyproject.toml)"
    )


def check_paho() -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    missing = [name for name in PAHO_CLASS_MEMBERS if not callable(getattr(mqtt.Client, name, None))]
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    missing += [name for name in PAHO_INSTANCE_STATE if not hasattr(client, name)]
    if missing:
        raise _refuse("paho-mqtt", missing, "MQTT collector's fast receive path")


def check_asyncua() -> None:
    from asyncua.common.subscription import Subscription

    missing = [name for name in ASYNCUA_SUBSCRIPTION_MEMBERS if not callable(getattr(Subscription, name, None))]
    if missing:
        raise _refuse("asyncua", missing, "OPC UA collector's notification path")
