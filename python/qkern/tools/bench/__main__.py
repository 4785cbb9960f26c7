"""``python -m qkern.tools.bench ...``: the same as ``qkern bench ...``."""

from . import main

raise SystemExit(main())
