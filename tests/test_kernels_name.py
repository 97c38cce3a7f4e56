"""The folder kernels/ imports as mhla_kernels; run from a checkout it must not capture
the bare name `kernels` (PyPI's Hugging Face hub kernels, which transformers >= 5 requires
and which transformers and diffusers import when installed)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _in_checkout(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repo root, where sys.path[0] is the checkout."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _pypi_kernels() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_bare_name_is_not_the_operator():
    proc = _in_checkout("import kernels, mhla_kernels; print(kernels.__file__); "
                        "print(mhla_kernels.__file__); print(callable(mhla_kernels.mhla))")
    if not _pypi_kernels():
        assert proc.returncode != 0
        assert "import it as mhla_kernels" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    bare, ours, ok = proc.stdout.split()
    assert Path(ours) == REPO / "kernels" / "__init__.py" and ok == "True"
    assert not Path(bare).is_relative_to(REPO / "kernels"), bare


@pytest.mark.skipif(not _pypi_kernels(), reason="PyPI's kernels is not installed")
def test_diffusers_and_transformers_import_it_from_a_checkout():
    """What failed: diffusers' Wan VAE imports transformers' hub-kernels integration,
    which does `from kernels import CUDAProperties`."""
    proc = _in_checkout("from diffusers import AutoencoderKLWan; "
                        "from transformers.integrations import hub_kernels; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_absent_package_fails_as_if_the_folder_were_not_there():
    from mhla_kernels._bare_name import hand_over

    with pytest.raises(ModuleNotFoundError, match="import it as mhla_kernels") as exc:
        hand_over("no_such_package_mhla", str(REPO / "kernels" / "__init__.py"))
    assert exc.value.name == "no_such_package_mhla"
