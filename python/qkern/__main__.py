"""``python -m qkern ...``: the same as the ``qkern`` command."""

from .tools.cli import main

raise SystemExit(main())
