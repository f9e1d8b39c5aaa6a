"""The relay's DMZ end: verify, enforce the approved flows, store durably, then acknowledge and forward.

`acceptor` (signature, sequence and flow checks, the durable DMZ spool, security events and audit
log), `gateway` (the mutual-TLS listener), `diode_receive` (the one-way UDP receiver) and `writer`
(forwards the DMZ spool to the historian in IT). Nothing here imports the OT end.
"""
