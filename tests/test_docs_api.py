"""The API reference has an entry for every public name, and the site builds with it."""

from __future__ import annotations

import html
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import corral
from corral import Pool

ROOT = Path(__file__).parent.parent
API = ROOT / "docs" / "api.md"


def directives() -> list[str]:
    return re.findall(r"^::: (\S+)$", API.read_text(), flags=re.M)


def test_every_public_name_has_an_entry_in_the_api_reference() -> None:
    documented = set(directives())
    missing = [name for name in corral.__all__ if f"corral.{name}" not in documented]
    assert not missing, f"add '::: corral.NAME' to docs/api.md for {missing}"


def test_every_public_method_of_the_pool_is_listed() -> None:
    text = API.read_text()
    block = text[text.index("::: corral.Pool\n") :].split("\n\n", 1)[0]
    listed = re.findall(r"^ +- (\w+)$", block, flags=re.M)
    public = [
        name
        for name, value in vars(Pool).items()
        if not name.startswith("_") and inspect.isfunction(value)
    ]
    assert sorted(listed) == sorted(public)
    assert {"run", "aclose", "wait_ready", "statistics", "submit", "executor"} <= set(listed)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    return out


def text_of(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.mark.timeout(300)
def test_the_reference_renders_every_public_name_from_its_docstring(site: Path) -> None:
    page = (site / "api" / "index.html").read_text()
    for name in corral.__all__:
        assert f'id="corral.{name}"' in page, name
    for method in ("run", "aclose", "wait_ready", "statistics", "submit", "executor"):
        assert f'id="corral.Pool.{method}"' in page, method
    text = text_of(site / "api" / "index.html")
    assert "start_within" in text  # a parameter of submit and run, from the docstrings
    assert ":class:" not in text and ":meth:" not in text  # Sphinx roles shown as code


@pytest.mark.timeout(300)
def test_the_home_page_shows_the_quick_start_and_a_highlighted_example(site: Path) -> None:
    page = (site / "index.html").read_text()
    text = text_of(site / "index.html")
    assert "corral run corral.demo --duration 30" in text
    assert "SchedulerConfig(enabled=True, workers=2)" in text
    assert 'class="highlight"' in page and '<span class="kn">from</span>' in page
    assert 'class="md-tabs' in page  # the parts of the site are tabs, not a wrapping list


@pytest.mark.timeout(300)
def test_search_indexes_every_page(site: Path) -> None:
    index = json.loads((site / "search" / "search_index.json").read_text())
    locations = {entry["location"].split("#")[0] for entry in index["docs"]}
    nav = re.findall(r"^ +- [^:]+: (\S+)\.md$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    for page in nav:
        assert ("" if page == "index" else f"{page}/") in locations, page
