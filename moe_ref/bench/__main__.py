"""python -m moe_ref.bench cpu|gpu|merge|plot|tune ... (see moe_ref.bench.cli)."""

from .cli import main

raise SystemExit(main())
