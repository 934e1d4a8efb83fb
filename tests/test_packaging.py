"""What a package index shows (the wheel's metadata, the license, the README and its links), the
``corral --version`` command, and the ``corral[ravyn]`` extra."""

from __future__ import annotations

import ast
import email
import re
import subprocess
import sys
import zipfile
from email.message import Message
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = "https://corral.readthedocs.io/en/latest/"
README = (ROOT / "README.md").read_text()


def link_targets(markdown: str) -> list[str]:
    inline = re.findall(r"\]\(([^)\s]+)", markdown)  # [text](target)
    definitions = re.findall(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", markdown, flags=re.M)
    autolinks = re.findall(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", markdown)
    html = re.findall(r"(?:href|src)=\"([^\"]+)\"", markdown)
    return inline + definitions + autolinks + html


def test_license_is_mit_with_the_copyright_line() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The corral authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_readme_has_no_relative_links() -> None:
    targets = link_targets(README)
    assert targets
    relative = [target for target in targets if not target.startswith("https://")]
    assert not relative, f"relative links break on a package index page: {relative}"
    used = set(re.findall(r"\]\[([^\]]+)\]", README))
    defined = set(re.findall(r"^ {0,3}\[([^\]]+)\]:", README, flags=re.M))
    assert used <= defined, f"undefined link references: {used - defined}"


def test_readme_links_to_docs_pages_that_exist_at_one_docs_address() -> None:
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^site_url: (\S+)$", mkdocs, flags=re.M)[1] == DOCS  # type: ignore[index]
    docs_links = [target for target in link_targets(README) if "readthedocs" in target]
    assert len(docs_links) >= 10
    for target in docs_links:
        assert target.startswith(DOCS), target
        page = target.removeprefix(DOCS).split("#")[0].strip("/") or "index"
        assert (ROOT / "docs" / f"{page}.md").is_file(), target
        assert f" {page}.md\n" in mkdocs, f"{page}.md is not in the site's navigation"


def test_ci_builds_the_distributions_and_checks_their_metadata() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "python -m build" in script
    assert "twine check --strict dist/*" in script


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("corral-*.whl")
    return built


def metadata_of(wheel: Path) -> tuple[Message, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (path,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(path)), names


@pytest.mark.timeout(600)
def test_the_wheel_says_what_a_package_index_shows(wheel: Path) -> None:
    meta, names = metadata_of(wheel)
    classifiers = meta.get_all("Classifier") or []
    for classifier in (
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Framework :: AsyncIO",
        "Typing :: Typed",
    ):
        assert classifier in classifiers
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "corral/py.typed" in names
    assert meta["Author"] == "The corral authors"
    assert "scheduler" in meta["Keywords"].split(",")
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert urls["Documentation"] == DOCS
    assert all(url.startswith(DOCS) for url in urls.values())
    assert "ravyn" in (meta.get_all("Provides-Extra") or [])
    assert "ravyn>=0.4.3; extra == 'ravyn'" in (meta.get_all("Requires-Dist") or [])
    assert not any(
        "ravyn" in requirement and "extra" not in requirement
        for requirement in meta.get_all("Requires-Dist") or []
    ), "Ravyn must stay optional"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload() == README


@pytest.mark.timeout(600)
def test_twine_accepts_the_wheel(wheel: Path) -> None:
    pytest.importorskip("twine")
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_corral_version_prints_the_packages_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "corral", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == f"corral {version('corral')}"


def test_corral_ravyn_without_ravyn_says_which_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['ravyn'] = None  # what the import system does for a missing package\n"
        "try:\n"
        "    import corral.ravyn\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "corral.ravyn needs Ravyn" in result.stdout
    assert "pip install 'corral[ravyn]'" in result.stdout


def test_corral_never_imports_pydantics_private_modules() -> None:
    for path in (ROOT / "src" / "corral").rglob("*.py"):
        source = path.read_text()
        assert "pydantic._internal" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            assert not any(m.startswith("pydantic._") for m in modules), (path, node.lineno)


def test_corral_ravyns_config_keeps_pydantics_metaclass() -> None:
    code = (
        "from pydantic import BaseModel\n"
        "from corral.ravyn import SchedulerConfig\n"
        "assert issubclass(type(SchedulerConfig), type(BaseModel))\n"
        "print(SchedulerConfig(enabled=True, workers=3).workers)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "3"
