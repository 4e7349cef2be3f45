"""The benchmark suite: the same as ``python -m kdlib bench`` (arguments pass through).

    python benchmarks/bench.py --shapes cpu --out bench-cpu
    python benchmarks/bench.py --shapes study --out bench-gpu      # on a GPU

Results and the commands that made them: docs/benchmarks.md.
"""

import sys

from kdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
