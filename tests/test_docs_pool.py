"""The pool page's examples do what the page says."""

from __future__ import annotations

import math
import re

from test_docs import run_example


def test_pool_run_example_awaits_jobs_in_workers_under_asyncio_and_trio() -> None:
    out = run_example("pool_run.py")
    app = int(re.findall(r"app process (\d+)", out)[0])
    bits = math.factorial(50_000).bit_length()
    for loop in ("asyncio", "trio"):
        (worker,) = re.findall(rf"^{loop}: {bits} bits, computed in process (\d+)$", out, re.M)
        assert int(worker) != app


def test_pool_executor_example_keeps_the_timeout_of_each_call() -> None:
    out = run_example("pool_executor.py").splitlines()
    assert out[:2] == ["[0, 1, 4, 9, 16, 25]", "144"]
    assert re.fullmatch(
        r"hang: job \d+ \(__main__:hang\) ran past its timeout of 1s; worker \d+ was killed "
        r"and replaced",
        out[2],
    )
    assert out[3:] == ["9"]
