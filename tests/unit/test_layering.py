"""``trainers/`` imports torch, numpy and the standard library only (ARCHITECTURE.md §2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trainers
import trainers.eval

FORBIDDEN = ("ray", "mlflow", "boto3", "botocore", "pyarrow", "optuna", "sklearn", "scipy", "pandas", "yaml",
             "orchestrator", "search")
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
