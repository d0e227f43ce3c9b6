"""Release metadata: one version source, floors equal to the tested ones, links that work on
the package index, license and citation files."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import lightning_manifold_mixup

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once_and_matches_changelog_and_citation() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    version = lightning_manifold_mixup.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+)", changelog, re.M)
    assert first is not None and first.group(1) == version
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(version)}$", citation, re.M)


def test_dependencies_have_floors_only_and_they_are_the_tested_floors() -> None:
    floors = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            floors[name] = version
    core = PYPROJECT["project"]["dependencies"]
    assert {re.split(r"[><=]", d)[0] for d in core} == {"torch", "lightning", "numpy"}
    for dep in [*core, *PYPROJECT["project"]["optional-dependencies"]["examples"]]:
        assert "<" not in dep and "==" not in dep, dep  # no upper caps in a release
    for dep in core:
        name, floor = dep.split(">=")
        # The floor environment pins the oldest release of the declared minor version.
        assert floors[name].startswith(floor + "."), (dep, floors[name])
    assert floors["pytorch-lightning"] == floors["lightning"]


def test_readme_links_are_absolute_so_they_work_on_the_package_index() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links  # the paper link at least
    assert [link for link in links if not link.startswith("https://")] == []


def test_license_and_citation_files_ship_and_say_what_the_metadata_says() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    citation = (ROOT / "CITATION.cff").read_text()
    assert "license: Apache-2.0" in citation
    assert "Manifold Mixup: Better Representations by Interpolating Hidden States" in citation
    sdist = PYPROJECT["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    assert {"LICENSE", "CITATION.cff", "CHANGELOG.md", "docs"} <= set(sdist)
