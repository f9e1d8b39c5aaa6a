"""``python -m flowline`` is the same as the ``flowline`` command (stage processes are started this way)."""

from flowline.cli import main

main()
