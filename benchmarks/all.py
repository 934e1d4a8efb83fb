"""Every benchmark, one after the other, writing what the docs show.

    python benchmarks/all.py [--repeat 3]

Runs ``pool.py``, ``scheduler.py``, ``waits.py`` and ``dask.py`` (each prints its table), writes
their JSON to ``benchmarks/results/`` and the loop-lag plot to ``docs/img/loop-lag.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    repeat = ["--repeat", str(args.repeat)]
    commands = [
        ["pool.py", "--json", str(results / "pool.json"), *repeat],
        [
            "scheduler.py",
            "--json",
            str(results / "scheduler.json"),
            "--plot",
            str(ROOT / "docs" / "img" / "loop-lag.png"),
            *repeat,
        ],
        ["waits.py", "--json", str(results / "waits.json"), *repeat],
        ["dask.py", "--json", str(results / "dask.json"), *repeat],
    ]
    for script, *options in commands:
        subprocess.run([sys.executable, str(HERE / script), *options], check=True, cwd=HERE)


if __name__ == "__main__":
    main()
