"""``python -m qkern ...``: the same as the ``qkern`` command."""

from .cli import main

raise SystemExit(main())
