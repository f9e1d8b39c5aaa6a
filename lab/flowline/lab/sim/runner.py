"""Live simulation: the plant model served in real time over OPC UA and MQTT.

Usage (in-process, e.g. from the demo or a test)::

    plant = Plant(site, seed=7, epoch_ns=now)
    sim = Simulator(plant, opcua=SimOpcUaServer(site), mqtt=MqttPublisher(site, MqttSettings(...)))
    stop = asyncio.Event()
    await sim.run(stop, on_ready=lambda: print("READY", sim.opcua.url))   # called after the first step

Every period (1 / rate_hz) each OPC UA variable is set and each MQTT tag published with the model's
value at that instant (timestamps on the period grid, so the same instant gives the same value as
in the backfill).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import numpy as np

from flowline.lab.sim.mqtt_publisher import MqttPublisher
from flowline.lab.sim.opcua_server import SimOpcUaServer
from flowline.lab.sim.plant import NS_PER_S, Plant


class Simulator:
    def __init__(
        self,
        plant: Plant,
        opcua: SimOpcUaServer | None = None,
        mqtt: MqttPublisher | None = None,
        rate_hz: float = 1.0,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.plant = plant
        self.opcua = opcua
        self.mqtt = mqtt
        self.period_ns = int(NS_PER_S / rate_hz)
        self.steps = 0

    async def step(self, t_ns: int) -> None:
        """Serve every tag's value at ``t_ns``."""
        when = np.array([t_ns], dtype=np.int64)
        if self.opcua is not None:
            for asset, tag in self.opcua.tags():
                if self.plant.site.tag(asset, tag) is not None:
                    value = float(self.plant.series(asset, tag, when)[0])
                    await self.opcua.set_value(asset, tag, value, source_ts=t_ns)
        if self.mqtt is not None:
            for asset, tag in self.mqtt.tags():
                self.mqtt.publish(asset, tag, float(self.plant.series(asset, tag, when)[0]), t_ns)
        self.steps += 1

    async def seed_opcua_history(self, hours: float) -> None:
        """Give the OPC UA server ``hours`` of past values, so a collector's HistoryRead finds a history."""
        if self.opcua is None or hours <= 0:
            return
        end = time.time_ns() // self.period_ns * self.period_ns
        times = np.arange(end - int(hours * 3600 * NS_PER_S), end, self.period_ns, dtype=np.int64)
        for asset, tag in self.opcua.tags():
            if self.plant.site.tag(asset, tag) is not None:
                values = self.plant.series(asset, tag, times).tolist()
                await self.opcua.seed_history(asset, tag, list(zip(times.tolist(), values, strict=True)))

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Start the servers, serve until ``stop`` is set, then stop them."""
        if self.opcua is not None:
            await self.opcua.start()
        try:
            if self.mqtt is not None:
                await asyncio.to_thread(self.mqtt.start)
            ready = on_ready
            while not stop.is_set():
                now = time.time_ns()
                tick = now - now % self.period_ns
                await self.step(tick)
                if ready is not None:  # after the first step: clients never see the placeholder values
                    ready()
                    ready = None
                delay = (tick + self.period_ns - time.time_ns()) / NS_PER_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))
        finally:
            if self.mqtt is not None:
                await asyncio.to_thread(self.mqtt.stop)
            if self.opcua is not None:
                await self.opcua.stop()
