"""`python bench/_peak.py PEAK_FILE ARGS...` runs `ddpmkit ARGS...` in this process, then writes its
peak resident memory in MiB (VmHWM, _measure.peak_rss_mib) to PEAK_FILE and exits with its status.

The benchmarks that train rows (options.py, recipe.py) start `ddpmkit train` through it, so that
each row's memory is its own process's: exec starts a fresh memory map, whose high-water mark
the parent cannot see once the child is gone.
"""

import sys
from pathlib import Path

import _measure

from ddpmkit.cli import main

if __name__ == "__main__":
    status = main(sys.argv[2:])
    Path(sys.argv[1]).write_text(f"{_measure.peak_rss_mib():.1f}\n")
    sys.exit(status)
