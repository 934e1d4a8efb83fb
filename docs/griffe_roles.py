"""Docstrings in the API reference: Sphinx roles (``:class:`Pool```) shown as inline code.

corral's docstrings are read in editors and ``help()`` too, where the roles are the usual way to
name an object; the reference (mkdocstrings, Markdown) would show them literally.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|exc|data|mod|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`name``` as ```name``` in every docstring when it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
