"""The OT -> DMZ boundary: OT sender, DMZ gateway, DMZ -> historian writer, and strict diode mode.

Modules: `frames` (signed wire frames), `body` (series-grouped batch bodies), `batching` (batches
from OT spools, the sender's sequence journal), `sender`, `gateway`, `acceptor` (policy, sequence,
durable DMZ spool, audit), `forwarder` (writer), `diode`, `netem` (link simulation for rehearsals).
"""
