"""``python -m qkern.bench ...``: the same as ``qkern bench ...``."""

from ..tools.bench import main

raise SystemExit(main())
