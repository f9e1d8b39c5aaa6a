"""The relay's OT end: batches from the OT spools, signed and sequenced, pushed to the DMZ.

`batching` (batches and the sender's sequence journal), `sender` (the mutual-TLS OT sender) and
`diode_send` (the same batches over a one-way UDP link). Nothing here listens on a socket, and
nothing here imports the DMZ end (an import contract checks it).
"""
