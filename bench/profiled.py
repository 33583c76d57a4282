"""Run `mailflow worker` under cProfile with a CPU-time clock (waits do not count).

    python bench/profiled.py OUT.prof   # same environment as `python -m mailflow worker`

`bench/run.py --profile DIR` uses it; read the result with
`python -c "import pstats; pstats.Stats('OUT.prof').sort_stats('cumtime').print_stats(40)"`.
"""

from __future__ import annotations

import cProfile
import sys
import time

from mailflow.cli.app import main

if __name__ == "__main__":
    profile = cProfile.Profile(time.process_time)
    try:
        code = profile.runcall(main, ["worker"])
    finally:
        profile.dump_stats(sys.argv[1])
    sys.exit(code)
