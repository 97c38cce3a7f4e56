"""The bare import name `kernels` belongs to PyPI's `kernels` (Hugging Face hub kernels).

This folder installs as `mhla_kernels`. Run from a checkout (`python -m ...` in the repo
root, pytest's rootdir on `sys.path`, a tool that puts the root first), the folder also
shadows `import kernels` for every library in the process. transformers (5.25 requires
that package) and diffusers import it when it is installed: they would get this operator
instead, and fail (`cannot import name 'CUDAProperties' from 'kernels'`). `hand_over` gives
such an import the real package, or fails as if this folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def hand_over(name: str, init_file: str) -> None:
    """Put the `kernels` found on `sys.path` past this checkout into `sys.modules[name]`
    (the import statement then returns it), or raise ModuleNotFoundError."""
    root = Path(init_file).resolve().parents[1]
    search = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {root / 'kernels'} is the MHLA operator: "
            "import it as mhla_kernels)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(f"{name}._bare_name", None)  # this helper, imported under the bare name
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
