"""MQTT collector throughput: JSON messages/s decoded and spooled, next to what the broker gives mosquitto_sub.

Both consumers drain the same kind of backlog from a real Mosquitto: N QoS 1 JSON messages queued
in a persistent session while the consumer was away. ``mosquitto_sub`` (C, discards the payload)
is the broker's delivery rate; the collector decodes every message, maps it to a site tag, spools
it durably (fsync per group commit) and only then acknowledges it. The ratio is the figure.

Each round measures ``mosquitto_sub`` and then the collector with MQTT 3.1.1 and MQTT 5 on fresh
backlogs; the figures are medians over the rounds (5 by default), the ratio the median of the
rounds' ratios. ``mosquitto_sub`` (libmosquitto) makes about seven system calls per message
(``strace -c``: four reads, a pselect, a PUBACK write and two writes of the payload to stdout); the
collector reads 64 KiB at a time and acknowledges a batch in one write, which is how it can beat it.

Run from the repo root: ``.venv/bin/python bench/mqtt_decode.py [--quick] [--rounds N]``.
Writes ``bench/results/mqtt_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.core.config import load_config
from flowline.lab.services import MosquittoServer, find_binary, wait_until

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


def forget_session(broker: MosquittoServer, client_id: str) -> None:
    """Drop a persistent session once measured: a session left behind would queue every later
    round's backlog too, and the broker slows down under millions of queued messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.username_pw_set(USER, PASSWORD)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    wait_until(client.is_connected, 30, f"clean-session connect as {client_id}")
    client.disconnect()
    client.loop_stop()


def mosquitto_sub_rate(broker: MosquittoServer, count: int, client_id: str) -> float:
    # create the persistent session, then leave so the backlog queues up
    subprocess.run([*_sub_args(broker, client_id), "-W", "1"], capture_output=True)
    _publish_backlog(broker, count)
    start = time.perf_counter()
    subprocess.run([*_sub_args(broker, client_id), "-C", str(count)], stdout=subprocess.DEVNULL, check=True)
    rate = count / (time.perf_counter() - start)
    forget_session(broker, client_id)
    return rate


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
    forget_session(broker, "bench-paho")
    return count / elapsed


def collector_rate(
    broker: MosquittoServer, folder: Path, count: int, protocol: str, client_id: str
) -> tuple[float, float]:
    """Messages/s and the cores the collector process used meanwhile."""
    from flowline.collectors.mqtt import MqttCollector

    folder.mkdir(parents=True)
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
                    "insecure_plain": True,
                    "username": USER,
                    "password": {"file": "password"},
                    "client_id": client_id,
                    "protocol": protocol,
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
    cpu_start, start = time.process_time(), time.perf_counter()
    collector.start()
    wait_until(lambda: collector.metrics.total("points_out_total") >= count, 600, "backlog spooled", interval=0.01)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    collector.stop()
    forget_session(broker, client_id)
    return count / elapsed, cpu / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller backlog, one round, under a minute")
    parser.add_argument("--rounds", type=int, default=5, help="rounds to take medians over (default 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    count, rounds = (20_000, 1) if args.quick else (100_000, args.rounds)
    runs: dict[str, list[float]] = {k: [] for k in ("raw", "ours", "cores", "ours5", "cores5", "ratio", "ratio5")}
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        broker = MosquittoServer(Path(tmp) / "broker", users={USER: PASSWORD})
        broker.start()
        try:
            paho = paho_rate(broker, count)  # the library's ceiling, for context: once is enough
            for n in range(rounds):
                # one round: the broker's delivery rate, then both protocols, back to back
                raw = mosquitto_sub_rate(broker, count, f"bench-sub-{n}")
                ours, cores = collector_rate(broker, Path(tmp) / f"v311-{n}", count, "3.1.1", f"bench-311-{n}")
                ours5, cores5 = collector_rate(broker, Path(tmp) / f"v5-{n}", count, "5", f"bench-5-{n}")
                for key, value in zip(runs, (raw, ours, cores, ours5, cores5, ours / raw, ours5 / raw), strict=True):
                    runs[key].append(value)
                print(f"round {n + 1}/{rounds}: mosquitto_sub {raw:,.0f}, 3.1.1 {ours:,.0f}, MQTT 5 {ours5:,.0f} msg/s")
        finally:
            broker.stop()
    med = {key: statistics.median(values) for key, values in runs.items()}
    figures = {
        "messages": count,
        "rounds": rounds,
        "mosquitto_sub_msgs_per_s": med["raw"],
        "paho_bare_msgs_per_s": paho,
        "collector_msgs_per_s": med["ours"],
        "collector_cpu_cores": med["cores"],
        "collector_mqtt5_msgs_per_s": med["ours5"],
        "collector_mqtt5_cpu_cores": med["cores5"],
        "ratio_vs_mosquitto_sub": med["ratio"],
        "ratio_vs_mosquitto_sub_min": min(runs["ratio"]),
        "ratio_mqtt5_vs_mosquitto_sub": med["ratio5"],
        "ratio_mqtt5_vs_mosquitto_sub_min": min(runs["ratio5"]),
        "ratio_vs_paho_bare": med["ours"] / paho,
        "quick": int(args.quick),
    }
    print(f"\nmedians over {rounds} round(s) of {count:,} QoS 1 messages")
    print(f"{'consumer':<36} {'messages/s':>11}  {'cores':>5}  {'ratio':>5}  {'min ratio':>9}")
    print(f"{'mosquitto_sub (broker delivery)':<36} {med['raw']:>11,.0f}")
    print(f"{'bare paho-mqtt client (counts only)':<36} {paho:>11,.0f}")
    for label, rate, cores_used, ratio, key in (
        ("flowline collect mqtt, 3.1.1", med["ours"], med["cores"], med["ratio"], "ratio"),
        ("flowline collect mqtt, MQTT 5", med["ours5"], med["cores5"], med["ratio5"], "ratio5"),
    ):
        print(f"{label:<36} {rate:>11,.0f}  {cores_used:>5.2f}  {ratio:>5.2f}  {min(runs[key]):>9.2f}")
    print(f"wrote {write_results('mqtt_decode', figures)}")


if __name__ == "__main__":
    main()
