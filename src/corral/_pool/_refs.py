"""Function references: how a job names the function a worker must import and call."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

from corral._exceptions import NotImportableError

_HOW_TO_FIX = "define it at the top level of an importable module"
_KEPT_AS = ("fn",)  # where a decorator's object keeps the function it replaced


def reference_of(fn: Callable[..., Any] | str) -> str:
    """Return ``"module:qualname"`` for ``fn``, checked to resolve back to ``fn`` itself.

    A method of a module-level instance is ``"module:instance.method"``; a function whose
    module-level name a decorator replaced by an object that keeps it as ``.fn`` (Ravyn's
    ``@scheduler`` does) is ``"module:name.fn"``.

    Raises:
        NotImportableError: ``fn`` cannot be imported by reference in another process.
    """
    if isinstance(fn, str):
        _check_reference_text(fn)
        return fn
    if inspect.ismethod(fn) and not inspect.isclass(fn.__self__):
        return _method_reference(fn)
    module, qualname = check_importable(fn)
    reference = f"{module}:{qualname}"
    try:
        found = _lookup(reference)
    except NotImportableError:
        found = None
    if found is fn or (callable(found) and found == fn):
        return reference
    for attribute in _KEPT_AS:
        if found is not None and getattr(found, attribute, None) is fn:
            return f"{reference}.{attribute}"
    raise NotImportableError(
        f"{fn!r} is not what {reference} names (a name that a decorator replaced, or that "
        f"was assigned something else); pass a module-level function, and {_HOW_TO_FIX}"
    )


def _method_reference(method: Any) -> str:
    """``"module:instance.method"`` for a method of an instance that a module-level name holds."""
    owner, name = method.__self__, method.__func__.__name__
    if getattr(owner, name, None) != method:
        raise NotImportableError(
            f"{method!r} is not reachable as {type(owner).__name__}.{name} on its instance; "
            f"pass a method the instance has under its own name, or a module-level function"
        )
    for module_name, namespace in _namespaces(method.__module__, type(owner).__module__):
        for attribute, value in namespace:
            if value is owner:
                return f"{module_name}:{attribute}.{name}"
    cls = type(owner).__name__
    raise NotImportableError(
        f"{method!r} is a method of {_short(owner)}, which no module-level name holds, so a "
        f"worker process cannot find that instance; create it at the top level of an "
        f"importable module ({cls.lower()} = {cls}()) and pass {cls.lower()}.{name}, or pass "
        f"a module-level function"
    )


def _namespaces(*first: str) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """The globals of ``first`` modules, then of every other loaded module that a worker can
    import (``__main__`` only if it has a file)."""
    names = list(dict.fromkeys([*first, *list(sys.modules)]))
    for name in names:
        if name == "__main__" and not _main_is_importable():
            continue
        namespace = getattr(sys.modules.get(name), "__dict__", None)
        if isinstance(namespace, dict):
            yield name, list(namespace.items())


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
    target = _lookup(reference)
    if not callable(target):
        raise NotImportableError(f"{reference!r} names {target!r}, which is not callable")
    return target  # type: ignore[no-any-return]


def _lookup(reference: str) -> Any:
    """Import and return the object that ``"module:qualname"`` names."""
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
    return target


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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
