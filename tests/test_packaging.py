"""What a wheel of sali holds: every package and data file the code needs (an editable install
hides a package left out of pyproject.toml; a user's `pip install sali` would not)."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_package_directory_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_package_data_covers_the_data_files():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["sali"]
    folder = ROOT / setuptools["package-dir"]["sali"]
    data = {p.relative_to(folder) for p in (folder / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    covered = {p.relative_to(folder) for pattern in patterns for p in folder.glob(pattern)}
    assert data and data <= covered, f"data files not in package-data: {sorted(map(str, data - covered))}"
