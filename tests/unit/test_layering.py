"""``trainers/`` imports torch, numpy and the standard library only (docs/architecture.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trainers
import trainers.eval

FORBIDDEN = ("ray", "mlflow", "boto3", "botocore", "pyarrow", "optuna", "sklearn", "scipy", "diffusers", "safetensors",
             "pandas", "yaml", "orchestrator", "search")
ROOT = Path(__file__).resolve().parents[2]

_IMPORT_ALL = """
import json, pkgutil, importlib, sys
import trainers
names = []
for info in pkgutil.walk_packages(trainers.__path__, prefix="trainers."):
    importlib.import_module(info.name)
    names.append(info.name)
forbidden = %r
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(forbidden))
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_trainers_module_loads_no_platform_library() -> None:
    out = _run(_IMPORT_ALL % (FORBIDDEN,))
    assert out["loaded"] == [], f"trainers/ pulled in {out['loaded']}"
    expected = {"trainers.loop", "trainers.step", "trainers.methods.compose", "trainers.methods.mtl.nash",
                "trainers.eval.frechet", "trainers.eval.feature_net", "trainers.models.dit", "trainers.data"}
    assert expected <= set(out["modules"])                      # the walk really covered the package
    on_disk = {p for p in (ROOT / "trainers").rglob("*.py")}
    assert len(out["modules"]) >= len(on_disk) - 1               # every file but trainers/__init__.py


def test_import_trainers_is_cheap() -> None:
    out = _run("import json, sys, trainers; print(json.dumps({'torch': 'torch' in sys.modules}))")
    assert out == {"torch": False}


def test_package_exports_resolve() -> None:
    for name in trainers.__all__:
        assert getattr(trainers, name) is not None, name
    assert issubclass(trainers.ConfigError, trainers.UserError)
    assert trainers.load_config({}).model.name == "DiT-T/2"
    assert sorted(trainers.eval.__all__) == sorted([
        "frechet_distance", "feature_stats", "precision_recall", "inception_score", "load_inception",
        "build_inception", "FeatureNet", "train_feature_net", "load_or_train_feature_net", "extract_features"])
    for name in trainers.eval.__all__:
        assert callable(getattr(trainers.eval, name)), name


def _imports(path: Path) -> set[str]:
    """Top-level package of every import statement in a Python file (lazy imports included)."""
    import ast
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_imports_point_one_way() -> None:
    """search -> orchestrator -> trainers: the orchestrator never imports search (its command
    arrives through the ``denoiselab.commands`` entry point), trainers neither of them."""
    for layer, forbidden in (("orchestrator", {"search"}), ("trainers", {"orchestrator", "search"})):
        for path in (ROOT / layer).rglob("*.py"):
            bad = _imports(path) & forbidden
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_search_command_is_contributed_by_entry_point() -> None:
    from orchestrator.cli.main import ENTRY_POINT_GROUP, build_parser
    from importlib import metadata
    names = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert names.get("search") == "search.cli:register"
    help_text = build_parser().format_help()
    assert "search" in help_text and "cost" in help_text


def test_no_reference_to_documents_the_project_does_not_ship() -> None:
    """Users have the repository only: no paths outside it, no internal design notes cited,
    and every ``docs/*.md`` a file mentions exists."""
    import re
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    texts = [ROOT / f for f in tracked if f.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt"))
             or f in ("Makefile", ".ci/run")]
    shipped = {Path(f).name for f in tracked}
    outside = "../" + "shared"                      # spelled apart so this file does not match itself
    for path in texts:
        text = path.read_text(errors="replace")
        assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside}"
        for doc in (n + ".md" for n in ("METHODS", "ARCHITECTURE", "PLATFORM")):
            assert doc not in text or doc in shipped, f"{path.relative_to(ROOT)} cites {doc}, not in the repository"
        for doc in set(re.findall(r"docs/[a-z_]+\.md", text)):
            assert (ROOT / doc).exists(), f"{path.relative_to(ROOT)} cites {doc}, which does not exist"


def test_every_package_directory_ships_in_a_plain_install() -> None:
    """A folder of modules without ``__init__.py`` imports in an editable checkout but is left out
    by ``pip install .`` (the Docker image): every one must be a regular package."""
    from setuptools import find_packages
    found = set(find_packages(str(ROOT), include=["orchestrator*", "trainers*", "search*"]))
    for top in ("orchestrator", "trainers", "search"):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if any(folder.glob("*.py")) and "__pycache__" not in folder.parts:
                name = ".".join(folder.relative_to(ROOT).parts)
                assert name in found, f"{name}: no __init__.py, so `pip install .` leaves it out"
