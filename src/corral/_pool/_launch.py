"""Light worker starts: a worker imports the app's ``__main__`` only when a job needs it.

``multiprocessing`` re-imports the parent's main module in every child it starts (and its
forkserver imports it once more). For a web app that main module is the server and the app
itself, so each worker would carry the whole web stack, or even run its start-up code. corral's
workers leave it out (recognised by their process name) and load it on demand, in the worker,
the first time a job refers to ``__main__``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.spawn
from typing import Any

WORKER_NAME_PREFIX = "corral-worker:"
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")
_original = multiprocessing.spawn.get_preparation_data
_installed = False


def _preparation_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = _original(name)
    if name.startswith(WORKER_NAME_PREFIX):
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


def install() -> None:
    """Route the stdlib's preparation of child processes through :func:`_preparation_data`."""
    global _installed
    if not _installed:
        multiprocessing.spawn.get_preparation_data = _preparation_data
        _installed = True


def parent_main() -> tuple[str, str] | None:
    """How the parent's ``__main__`` can be loaded again: ``("path"|"name", value)``."""
    data = _original("")
    for key in _MAIN_KEYS:
        if key in data:
            return ("path" if key.endswith("path") else "name", data[key])
    return None


def prefer_light_forkserver(preload: tuple[str, ...] = ()) -> None:
    """Have a forkserver that is not running yet preload only the worker's module (and the
    pool's ``preload`` modules, but never the app's ``__main__``)."""
    context = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:
        modules = ["corral._pool._worker", *(m for m in preload if m != "__main__")]
        context.set_forkserver_preload(modules)


def load_parent_main(main: tuple[str, str] | None) -> None:
    """In a worker: make ``__main__`` the parent's main module, as multiprocessing would."""
    if main is None:
        return
    kind, value = main
    if kind == "path":
        multiprocessing.spawn._fixup_main_from_path(value)  # type: ignore[attr-defined]
    else:
        multiprocessing.spawn._fixup_main_from_name(value)  # type: ignore[attr-defined]
