"""MQTT collector throughput: JSON messages/s decoded and spooled, next to what the broker gives mosquitto_sub.

Both consumers drain the same kind of backlog from a real Mosquitto: N QoS 1 JSON messages queued
in a persistent session while the consumer was away. ``mosquitto_sub`` (C, discards the payload)
is the broker's delivery rate; the collector decodes every message, maps it to a site tag, spools
it durably (fsync per group commit) and only then acknowledges it. The ratio is the figure.

Run from the repo root: ``.venv/bin/python bench/mqtt_decode.py [--quick]``.
Writes ``bench/results/mqtt_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.config import load_config
from flowline.services import MosquittoServer, find_binary, wait_until

USER, PASSWORD = "bench", "bench-password"
TAGS = 100


def _topic(i: int) -> str:
    return f"plant/bench/B-1/t{i % TAGS}"


def _publish_backlog(broker: MosquittoServer, count: int) -> None:
    now_ms = int(time.time() * 1000)
    per_tag: dict[str, list[str]] = {}  # one mosquitto_pub -l per topic, fed all its lines at once
    for i in range(count):
        line = json.dumps({"value": i * 0.5, "ts": now_ms + i, "quality": "good"}) + "\n"
        per_tag.setdefault(_topic(i), []).append(line)
    pub = find_binary("mosquitto_pub", "mosquitto-clients")
    procs = [
        subprocess.Popen(
            [pub, "-p", str(broker.port), "-u", USER, "-P", PASSWORD, "-q", "1", "-t", topic, "-l"],
            stdin=subprocess.PIPE,
            text=True,
        )
        for topic in per_tag
    ]
    for proc, topic in zip(procs, per_tag, strict=True):
        assert proc.stdin is not None
        proc.stdin.write("".join(per_tag[topic]))
        proc.stdin.close()
    for proc in procs:
        proc.wait(300)


def _sub_args(broker: MosquittoServer, client_id: str) -> list[str]:
    sub = find_binary("mosquitto_sub", "mosquitto-clients")
    return [
        sub,
        "-p",
        str(broker.port),
        "-u",
        USER,
        "-P",
        PASSWORD,
        "-q",
        "1",
        "-c",
        "-i",
        client_id,
        "-t",
        "plant/bench/#",
    ]


def mosquitto_sub_rate(broker: MosquittoServer, count: int) -> float:
    # create the persistent session, then leave so the backlog queues up
    subprocess.run([*_sub_args(broker, "bench-sub"), "-W", "1"], capture_output=True)
    _publish_backlog(broker, count)
    start = time.perf_counter()
    subprocess.run([*_sub_args(broker, "bench-sub"), "-C", str(count)], stdout=subprocess.DEVNULL, check=True)
    return count / (time.perf_counter() - start)


def paho_rate(broker: MosquittoServer, count: int) -> float:
    """The library ceiling: a bare paho-mqtt client that only counts (auto acks, no decoding, no spool)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    def client() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho", clean_session=False)
        c.username_pw_set(USER, PASSWORD)
        c.connect("127.0.0.1", broker.port)
        return c

    first = client()
    first.subscribe("plant/bench/#", qos=1)
    first.loop_start()
    time.sleep(0.5)
    first.disconnect()
    first.loop_stop()
    _publish_backlog(broker, count)
    received = [0]
    done = threading.Event()

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received[0] += 1
        if received[0] >= count:
            done.set()

    second = client()
    second.on_message = on_message
    start = time.perf_counter()
    second.loop_start()
    done.wait(600)
    elapsed = time.perf_counter() - start
    second.disconnect()
    second.loop_stop()
    return count / elapsed


def collector_rate(broker: MosquittoServer, folder: Path, count: int) -> float:
    from flowline.collectors.mqtt import MqttCollector

    tags = [{"name": f"t{i}", "source": {"mqtt": {"topic": _topic(i)}}} for i in range(TAGS)]
    site = {"site": "bench", "assets": [{"id": "B-1", "name": "b", "type": "b", "criticality": "C", "tags": tags}]}
    (folder / "site.yaml").write_text(yaml.safe_dump(site))
    (folder / "password").write_text(PASSWORD)
    config_doc = {
        "site_file": "site.yaml",
        "data_dir": "data",
        "collectors": {
            "mqtt": {
                "broker": {
                    "host": "127.0.0.1",
                    "port": broker.port,
                    "username": USER,
                    "password": {"file": "password"},
                    "client_id": "bench-collector",
                    "protocol": "3.1.1",
                }
            }
        },
    }
    (folder / "flowline.yaml").write_text(yaml.safe_dump(config_doc))
    config = load_config(folder / "flowline.yaml")
    first = MqttCollector(config)  # create the persistent session, then leave
    first.start()
    wait_until(first.connected.is_set, 30, "collector connected")
    time.sleep(0.5)  # the SUBACK must be in before leaving, or the backlog has no session to queue in
    first.stop()
    _publish_backlog(broker, count)
    collector = MqttCollector(config)
    start = time.perf_counter()
    collector.start()
    wait_until(lambda: collector.metrics.total("points_out_total") >= count, 600, "backlog spooled", interval=0.01)
    elapsed = time.perf_counter() - start
    collector.stop()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller backlog, under a minute")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    count = 20_000 if args.quick else 100_000
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        broker = MosquittoServer(Path(tmp) / "broker", users={USER: PASSWORD})
        broker.start()
        try:
            raw = mosquitto_sub_rate(broker, count)
            paho = paho_rate(broker, count)
            ours = collector_rate(broker, Path(tmp), count)
        finally:
            broker.stop()
    figures = {
        "messages": count,
        "mosquitto_sub_msgs_per_s": raw,
        "paho_bare_msgs_per_s": paho,
        "collector_msgs_per_s": ours,
        "ratio_vs_paho_bare": ours / paho,
        "ratio_vs_mosquitto_sub": ours / raw,
        "quick": int(args.quick),
    }
    print(f"{'consumer':<34} {'messages/s':>12}")
    print(f"{'mosquitto_sub (broker delivery)':<34} {raw:>12.0f}")
    print(f"{'bare paho-mqtt client (counts only)':<34} {paho:>12.0f}")
    print(f"{'flowline collect mqtt (spooled)':<34} {ours:>12.0f}")
    print(f"{'ratio vs mosquitto_sub':<34} {ours / raw:>12.2f}")
    print(f"{'ratio vs bare paho-mqtt':<34} {ours / paho:>12.2f}")
    print(f"wrote {write_results('mqtt_decode', figures)}")


if __name__ == "__main__":
    main()
