"""``python -m flowline.relay …``: the relay commands without loading the rest of the CLI (fast restarts)."""

from flowline.relay.cli import relay

relay(prog_name="python -m flowline.relay")
