"""The documentation: every public name has an API entry, and the site builds strictly."""

import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

import gaugejax
import gaugejax.nn
import gaugejax.optim


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api"

# `::: gaugejax.Name` on a line of its own (options may follow on indented lines).
_ENTRY = re.compile(r"^:::\s+(gaugejax(?:\.\w+)+)\s*$", re.MULTILINE)


def _public_names(module: types.ModuleType) -> list[str]:
    """Names a user reaches as `module.name`: not private, not a submodule."""
    return sorted(
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    )


def _documented() -> set[str]:
    found: set[str] = set()
    for page in API.rglob("*.md"):
        found.update(_ENTRY.findall(page.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("module", [gaugejax, gaugejax.nn, gaugejax.optim], ids=lambda m: m.__name__)
def test_every_public_name_has_an_api_entry(module):
    documented = _documented()
    names = _public_names(module)
    assert names, f"found no public names in {module.__name__}"
    missing = [
        f"{module.__name__}.{n}" for n in names if f"{module.__name__}.{n}" not in documented
    ]
    assert not missing, (
        f"public names without a `::: <name>` entry under {API.relative_to(ROOT)}/: {missing}. "
        "Add each to the API page of its topic."
    )


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        print(result.stdout)
        print(result.stderr)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    assert (tmp_path / "site" / "index.html").exists()


def _python_blocks(page: pathlib.Path) -> str:
    blocks = re.findall(
        r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL
    )
    return "\n".join(blocks)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["index.md", "concepts.md", "verification.md"])
def test_examples_run(page, tmp_path):
    """The `python` code blocks of a guide page, run in order as one script."""
    source = _python_blocks(DOCS / page)
    assert source.strip(), f"no python examples in {page}"
    script = tmp_path / f"{pathlib.Path(page).stem}_examples.py"
    script.write_text(source, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"the examples of docs/{page} failed:\n{result.stderr[-5000:]}"
