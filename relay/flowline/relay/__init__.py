"""The OT -> DMZ boundary, both ends of one protocol.

Shared by both ends: `frames` (signed wire frames), `body` (series-grouped batch bodies), `tls`
(contexts), `diode_wire` (the one-way datagram format). The ends: `ot` (the sender, OT zone) and
`dmz` (the gateway and the writer, DMZ). `cli` is ``flowline relay``.
"""
