"""Every package folder is in pyproject's explicit package list (a wheel would miss it)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = set()
    for top, name in (("kernels", "mhla_kernels"), ("mhla_dist", "mhla_dist")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"
