"""Every file in cluster/ is checked: the Ray cluster-launcher YAMLs against the schema inside the ray wheel."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from .conftest import REPO

LAUNCHER_FILES = ("aws.yaml", "onprem.yaml")


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_configs_follow_rays_schema_and_install_this_package(name: str, ray_schema: dict):
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    jsonschema.validate(config, ray_schema)
    # The checkout is shipped to every node and installed there; token auth is on for head and workers.
    assert "." in config["file_mounts"].values()
    assert any("pip install -c" in command and " -e " in command for command in config["setup_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in command and "ray start" in command for command in commands)
    assert any(path.endswith(".ray/auth_token") for path in config["file_mounts"])


def test_a_launcher_config_with_a_wrong_field_is_caught(ray_schema: dict):
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        jsonschema.validate(config, ray_schema)


KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def _cluster_specs(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda path: path.name)
def test_kuberay_manifests_have_the_fields_kuberay_requires_and_token_auth_from_a_secret(path: Path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    assert manifest["metadata"]["name"]
    spec = _cluster_specs(manifest)
    assert tuple(int(part) for part in spec["rayVersion"].split(".")) == tuple(
        int(part) for part in ray.__version__.split(".")[:3]
    )
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    for group in spec.get("workerGroupSpecs", []):
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = int(group["rayStartParams"].get("num-gpus", 0))
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) == gpus
    pods = _containers(spec)
    if manifest["kind"] == "RayJob":
        pods += manifest["spec"]["submitterPodTemplate"]["spec"]["containers"]
    # Ray pods get the token from KubeRay (authOptions); the job's submitter pod, which is ours, sets it itself.
    assert spec["authOptions"] == {"mode": "token", "secretName": "sr-tune-ray-token"}
    for container in pods:
        assert container["name"] and container["image"] and container["resources"]["requests"]
        if container["name"] == "ray-job-submitter":
            env = {item["name"]: item for item in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert secret == {"name": "sr-tune-ray-token", "key": "auth_token"}


@pytest.mark.parametrize("path", [p for p in KUBERAY if p.name.startswith("rayjob")], ids=lambda path: path.name)
def test_rayjob_entrypoints_are_real_sr_tune_commands_on_studies_that_load(path: Path):
    from sr_tune.cli import build_parser
    from sr_tune.storage import storage_problem
    from sr_tune.study import load_study

    entrypoint = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "sr_tune"]
    args = build_parser().parse_args(entrypoint[3:])
    assert (
        args.run.__name__ == "cmd_tune" and args.storage.startswith("s3://") and storage_problem(args.storage) is None
    )
    study = load_study(REPO / Path(args.study).relative_to("/app"))  # the image's /app is this repository
    # The GPU study's trials ask for what its workers have: every trial fits on one worker pod.
    spec = _cluster_specs(yaml.safe_load(path.read_text()))
    for group in spec.get("workerGroupSpecs", []):
        if study.resources.gpus_per_worker:
            assert int(group["rayStartParams"]["num-gpus"]) >= study.resources.workers * study.resources.gpus_per_worker


def test_the_image_installs_this_package_on_the_ray_version_in_use():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    for folder in ("sr_tune", "configs", "search_spaces"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in dockerfile and (REPO / folder).is_dir()
    assert 'pip install --no-cache-dir -c constraints.txt "/app[server]"' in dockerfile
