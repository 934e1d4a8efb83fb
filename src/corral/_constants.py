"""Small shared names, kept free of heavy imports: worker processes load this module too."""

from __future__ import annotations

from typing import Any, Literal


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""Stands for "the pool's or the config's setting" where ``None`` means something else."""

ExecutorKind = Literal["process", "thread", "asyncio", "dask"]
EXECUTOR_KINDS: tuple[ExecutorKind, ...] = ("process", "thread", "asyncio", "dask")
