"""The import contracts of `make lint` ([tool.importlinter] in pyproject.toml) catch what they forbid.

lint-imports runs, with the project's own configuration, on a scratch copy of the package into which one
forbidden import per contract is written (inside a function: function-level imports count). The same run
on the untouched copy is the control: the injected imports must be what breaks the contracts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import osp.common

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGES = ("common", "stage1_encode", "stage2_train")

# contract id -> (file of the scratch copy, module written to it, text that lint-imports reports for it)
INJECTED = {
    "stage2-no-encoders": ("stage2_train/optim.py", "osp.common.models.vae", "osp.stage2_train.optim -> osp.common"),
    "common-below-stages": ("common/shards.py", "osp.stage2_train.lock", "osp.common.shards -> osp.stage2_train"),
    "cli-on-top": ("stage2_train/lock.py", "osp.common.cli", "osp.stage2_train.lock -> osp.common.cli"),
    "models-no-devices": ("common/models/rope.py", "torch.distributed", "osp.common.models.rope -> torch.distributed"),
    "stages-independent": ("stage1_encode/plan.py", "osp.stage2_train.optim", "osp.stage1_encode.plan -> osp.stage2"),
    "no-cycles": ("common/hashing.py", "osp.common.models.vae", "No cycles are allowed in osp.common"),
}
# a second import into stage 2: transformers, an external package
TRANSFORMERS = ("stage2_train/lock.py", "transformers", "osp.stage2_train.lock -> transformers")


def _contracts() -> dict[str, dict]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _scratch_copy(dest: Path) -> Path:
    """The package's sources under dest/osp/ (a namespace package, as installed)."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / "osp" / pkg, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    return dest


def _inject(tree: Path, rel: str, module: str) -> None:
    path = tree / "osp" / rel
    with path.open("a") as f:
        f.write(f"\n\ndef _forbidden_import_probe():\n    import {module}  # noqa: F401\n")


def _lint_imports(tree: Path) -> tuple[int, str]:
    """lint-imports with the project's configuration, osp resolved from `tree` instead of the install."""
    installed = {str(Path(p).parents[1]) for p in osp.common.__path__}  # the folder holding osp/
    script = (
        "import sys\n"
        f"sys.path = [{str(tree)!r}] + [p for p in sys.path if p not in {sorted(installed)!r}]\n"
        "from importlinter.cli import lint_imports_command\n"
        "lint_imports_command()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(PYPROJECT), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _sections(report: str) -> dict[str, str]:
    """Contract name -> its part of the "Broken contracts" report."""
    broken = report.split("Broken contracts", 1)[1] if "Broken contracts" in report else ""
    names = [c["name"] for c in _contracts().values()]
    flat = re.sub(r"\s+", " ", broken)
    starts = sorted((flat.find(n), n) for n in names if n in flat)
    out = {}
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(flat)
        out[name] = flat[pos:end]
    return out


def test_contracts_are_configured():
    contracts = _contracts()
    assert set(contracts) == set(INJECTED)
    stage2 = contracts["stage2-no-encoders"]
    assert stage2["source_modules"] == ["osp.stage2_train"]
    assert {"osp.stage1_encode", "osp.common.models.vae", "osp.common.models.text", "transformers"} <= set(
        stage2["forbidden_modules"]
    )
    assert set(contracts["models-no-devices"]["forbidden_modules"]) >= {"osp.common.device", "torch.distributed"}
    # the one exception of common-below-stages is the CLI
    assert all(i.startswith("osp.common.cli -> ") for i in contracts["common-below-stages"]["ignore_imports"])
    assert "lint-imports" in (ROOT / "Makefile").read_text()  # `make lint` runs them


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> tuple[tuple[int, str], tuple[int, str]]:
    clean = _scratch_copy(tmp_path_factory.mktemp("clean"))
    dirty = _scratch_copy(tmp_path_factory.mktemp("injected"))
    for rel, module, _ in [*INJECTED.values(), TRANSFORMERS]:
        _inject(dirty, rel, module)
    return _lint_imports(clean), _lint_imports(dirty)


@pytest.mark.parametrize("contract", sorted(INJECTED))
def test_injected_import_breaks_contract(reports, contract):
    (_, clean), (rc, dirty) = reports
    assert "Contracts:" in dirty, dirty[-2000:]  # lint-imports ran the contracts (not a config error)
    assert rc != 0
    name = _contracts()[contract]["name"]
    assert f"{name} BROKEN" in re.sub(r"\s+", " ", dirty), dirty
    _, _, reported = INJECTED[contract]
    assert reported in _sections(dirty).get(name, ""), dirty
    # control: the same contract on the untouched copy reports no such import
    assert reported not in _sections(clean).get(name, "")


def test_transformers_in_stage2_breaks_contract(reports):
    (_, clean), (_, dirty) = reports
    name = _contracts()["stage2-no-encoders"]["name"]
    assert TRANSFORMERS[2] in _sections(dirty)[name]
    assert TRANSFORMERS[2] not in _sections(clean).get(name, "")
