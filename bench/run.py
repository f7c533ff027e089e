"""``python bench/run.py [options]``: the standard benchmark set (``bench/cli.py``; see bench/README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make the `bench` package importable
from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
