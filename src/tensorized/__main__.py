"""``python -m tensorized``."""

from .cli import main

raise SystemExit(main())
