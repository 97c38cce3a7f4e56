"""The import direction of DESIGN §3, checked on the source: a forbidden import fails here.

kernels (mhla_kernels) imports neither torch.distributed nor mhla_dist; parallel, data and
config import neither mhla_dist.model nor mhla_kernels internals (the package's public
names only); nothing imports from tools or tests.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def violations(folder: str, forbidden) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if forbidden(name):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_kernels_import_no_distributed_and_no_stack():
    bad = violations("kernels", lambda n: _is(n, "torch.distributed") or _is(n, "mhla_dist"))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("sub", ["parallel", "data", "config"])
def test_lower_layers_import_no_model_and_no_kernel_internals(sub):
    public = set(__import__("mhla_kernels").__all__)

    def forbidden(name: str) -> bool:
        if _is(name, "mhla_dist.model"):
            return True
        if _is(name, "mhla_kernels") and name != "mhla_kernels":
            return name.split(".", 1)[1] not in public
        return False

    assert not violations(f"mhla_dist/{sub}", forbidden)


def test_packages_import_no_tools_or_tests():
    for folder in ("kernels", "mhla_dist"):
        bad = violations(folder, lambda n: _is(n, "tools") or _is(n, "tests"))
        assert not bad, "\n".join(bad)
