"""The distribution name and every install hint: none can resolve to the unrelated `torchspec` placeholder on the
public package index, and each names the extra that pyproject.toml really defines (issue 17, item 3)."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from torchspec.utils import optional
from torchspec.utils.optional import DISTRIBUTION, install_hint, mooncake_extra, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_distribution_is_not_the_placeholder_name():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "torchspec-eagle3"
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["torchspec*"]   # import name kept


def test_hint_installs_from_the_checkout_or_the_installed_distribution(monkeypatch):
    assert optional.source_checkout() == ROOT
    assert install_hint("ray") == f"pip install -e '{ROOT}[ray]'"
    monkeypatch.setattr(optional, "source_checkout", lambda: None)   # torchspec from a wheel
    assert install_hint("ray") == "pip install 'torchspec-eagle3[ray]'"


def test_a_pyproject_of_another_project_is_not_our_checkout(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "torchspec"\n')
    fake = tmp_path / "torchspec" / "utils" / "optional.py"
    monkeypatch.setattr(optional, "__file__", str(fake))
    assert optional.source_checkout() is None


def test_mooncake_extra_is_chosen_like_the_setup_script(monkeypatch):
    monkeypatch.setattr(optional.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert mooncake_extra() == "mooncake"
    monkeypatch.setattr(optional.shutil, "which", lambda name: None)
    assert mooncake_extra() == "mooncake-cpu"
    script = (ROOT / "scripts" / "setup_mooncake.sh").read_text()
    assert "nvidia-smi" in script and "extra=mooncake;" in script and "extra=mooncake-cpu;" in script


def test_missing_mooncake_names_the_extra_for_this_machine(monkeypatch):
    from torchspec.transfer.mooncake import require_mooncake

    monkeypatch.setattr(optional.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    with pytest.raises(ImportError) as e:
        require_mooncake()
    assert str(e.value).endswith(f"install it with: pip install -e '{ROOT}[mooncake-cpu]'")


def test_every_extra_named_in_a_hint_exists():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    named = set()
    for f in [*ROOT.glob("torchspec/**/*.py")]:
        named |= set(re.findall(r"""install_hint\(["']([\w-]+)["']\)""", f.read_text()))
        named |= set(re.findall(r"""require\(["'][\w.]+["'], ["']([\w-]+)["']\)""", f.read_text()))
    assert named and named <= extras, named - extras
    with pytest.raises(ImportError, match=re.escape(f"install it with: pip install -e '{ROOT}[ray]'")):
        require("torchspec_no_such_module", "ray")


def _files():
    for pattern in ("*.md", "docs/*.md", "configs/*.md", "configs/*.yaml", "scripts/*", ".ci/*", "torchspec/**/*.py",
                    "tests/*.py", "pyproject.toml"):
        yield from (f for f in ROOT.glob(pattern) if f.is_file())


def test_no_install_line_names_the_placeholder():
    """`pip install torchspec...` (bare, with extras, quoted or not) anywhere in the repository would fetch the
    placeholder; a git URL or our distribution name is fine."""
    bad = []
    for f in _files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if f.name == Path(__file__).name:
                continue
            for m in re.finditer(r"""pip install (?:-\w+ )*['"]?torchspec(?![-\w])""", line):
                if "@ git+" not in line[m.end():]:
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []
