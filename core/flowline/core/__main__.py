"""``python -m flowline.core`` is the same as the ``flowline`` command (stage processes are started this way)."""

from flowline.core.cli import main

main()
