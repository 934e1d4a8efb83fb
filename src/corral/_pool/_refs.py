"""Function references: how a job names the function a worker must import and call."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from corral._exceptions import NotImportableError

_HOW_TO_FIX = "define it at the top level of an importable module"


def reference_of(fn: Callable[..., Any] | str) -> str:
    """Return ``"module:qualname"`` for ``fn``, checked to resolve back to ``fn`` itself.

    Raises:
        NotImportableError: ``fn`` cannot be imported by reference in another process.
    """
    if isinstance(fn, str):
        _check_reference_text(fn)
        return fn
    module, qualname = check_importable(fn)
    try:
        found = resolve(f"{module}:{qualname}")
    except NotImportableError:
        found = None
    if found is not fn and found != fn:
        raise NotImportableError(
            f"{fn!r} is not what {module}:{qualname} names (a bound method, or a name that a "
            f"decorator replaced); pass a module-level function, and {_HOW_TO_FIX}"
        )
    return f"{module}:{qualname}"


def check_importable(fn: Callable[..., Any]) -> tuple[str, str]:
    """Refuse what can never be imported by reference; return ``(module, qualname)``.

    Unlike :func:`reference_of`, this does not look the name up, so it works while the module
    that defines ``fn`` is still being imported (in a decorator).
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or module is None or qualname is None:
        raise NotImportableError(
            f"{fn!r} has no importable name (__module__ and __qualname__); "
            f"pass a function, and {_HOW_TO_FIX}"
        )
    if "<lambda>" in qualname or "<locals>" in qualname:
        kind = "a lambda" if "<lambda>" in qualname else "defined inside another function"
        raise NotImportableError(
            f"{fn!r} is {kind}, so a worker process cannot import it by reference; {_HOW_TO_FIX}"
        )
    if module == "__main__" and not _main_is_importable():
        raise NotImportableError(
            f"{fn!r} lives in __main__, which has no file a worker process can import "
            f"(interactive session, -c or stdin); {_HOW_TO_FIX}"
        )
    return module, qualname


def resolve(reference: str) -> Callable[..., Any]:
    """Import and return the callable that ``"module:qualname"`` names."""
    module_name, _, qualname = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotImportableError(
            f"cannot import module {module_name!r} for {reference!r}: {exc}; check that the "
            f"module is on sys.path of the worker processes"
        ) from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise NotImportableError(
                f"module {module_name!r} has no attribute {qualname!r} (from {reference!r}); "
                f"check the spelling of the reference"
            ) from None
    if not callable(target):
        raise NotImportableError(f"{reference!r} names {target!r}, which is not callable")
    return target  # type: ignore[no-any-return]


def _check_reference_text(reference: str) -> None:
    module_name, sep, qualname = reference.partition(":")
    if not sep or not module_name or not qualname:
        raise NotImportableError(
            f"function reference {reference!r} is not of the form 'package.module:function'"
        )


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py")
