"""Print the capacity quality table: drop share and output error vs capacity factor, skew and overflow.

    python -m moe_ref.capacity_table [--tokens 1024 --d-model 256 --d-ff 512 --experts 8 --top-k 2
                                      --capacity-factors 0.5 1.0 1.25 2.0 --skews 0 1 --out FILE.json]

A thin entry point over moe_ref.metrics.main (kept separate so `python -m` does not re-import a
module the package has already loaded).
"""

from .metrics import main

if __name__ == "__main__":
    main()
