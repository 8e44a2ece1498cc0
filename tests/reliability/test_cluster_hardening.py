"""The cluster files and the package's dependencies, read as an attacker or an autoscaler would: who can reach
a node, what each node's role may do, what a node installs, which Ray the code is tested on."""

from __future__ import annotations

import importlib
import re
import signal
from importlib.metadata import version

import ray
import yaml

from sr_tune.local_ray import RAY_PRIVATE_NAMES, TESTED_RAY

from ..conftest import REPO

CLUSTER = REPO / "cluster"


class _CloudFormationLoader(yaml.SafeLoader):
    """CloudFormation's short tags (!Ref, !Sub, !GetAtt) read as {"Ref": ...} and so on."""


for _tag in ("Ref", "Sub", "GetAtt"):
    _CloudFormationLoader.add_constructor(
        f"!{_tag}", lambda loader, node, tag=_tag: {tag: loader.construct_scalar(node)}
    )


def _pins() -> dict[str, str]:
    lines = (CLUSTER / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_aws_nodes_run_under_the_stacks_profiles_and_security_group_never_rays_defaults():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for name, node in config["available_node_types"].items():
        profile = "HEAD_PROFILE_ARN" if name == config["head_node_type"] else "WORKER_PROFILE_ARN"
        assert node["node_config"]["IamInstanceProfile"] == {"Arn": profile}, name
        assert node["node_config"]["SecurityGroupIds"] == ["SECURITY_GROUP_ID"], name  # Ray then opens no port


def test_the_stack_scopes_every_role_to_the_bucket_and_ssh_to_a_cidr_parameter():
    stack = yaml.load((CLUSTER / "aws-stack.yaml").read_text(), Loader=_CloudFormationLoader)
    ssh = stack["Parameters"]["SshCidr"]
    assert "Default" not in ssh and not re.fullmatch(ssh["AllowedPattern"], "0.0.0.0/0")
    assert re.fullmatch(ssh["AllowedPattern"], "203.0.113.7/32")
    (rule,) = stack["Resources"]["ClusterSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert rule["CidrIp"] == {"Ref": "SshCidr"} and (rule["FromPort"], rule["ToPort"]) == (22, 22)
    for role in ("HeadRole", "WorkerRole"):
        for policy in stack["Resources"][role]["Properties"]["Policies"]:
            for statement in policy["PolicyDocument"]["Statement"]:
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                assert not any(action.endswith(":*") or action == "*" for action in actions), (role, actions)
                if any(action.startswith("s3:") for action in actions):
                    assert "${BucketName}" in statement["Resource"]["Sub"], (role, statement)
                if any(action.startswith("iam:") for action in actions):
                    assert statement["Resource"]["GetAtt"].startswith("Worker"), (role, statement)
    worker_actions = {
        action
        for policy in stack["Resources"]["WorkerRole"]["Properties"]["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        for action in statement["Action"]
    }
    assert worker_actions and all(action.startswith("s3:") for action in worker_actions)


def test_every_node_installs_the_pinned_versions_the_tests_ran_with():
    pins = _pins()
    assert pins["ray"] == ray.__version__ and pins["torch"] == version("torch").split("+")[0]
    for name in ("torchvision", "optuna", "mlflow", "pillow", "pyarrow", "safetensors", "numpy"):
        assert pins[name] == version(name).split("+")[0], name
    for launcher in ("aws.yaml", "onprem.yaml"):
        config = yaml.safe_load((CLUSTER / launcher).read_text())
        installs = [command for command in config["setup_commands"] if "pip install" in command]
        assert installs and all("-c " in command and "cluster/constraints.txt" in command for command in installs)
        assert ".env*" in config["rsync_exclude"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and dockerfile.rstrip().endswith("USER ray")


def test_kuberay_pods_run_as_non_root_with_kuberays_token_auth_and_jobs_have_a_deadline():
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
        assert spec["authOptions"] == {"mode": "token", "secretName": "sr-tune-ray-token"}, path.name
        templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]
        if manifest["kind"] == "RayJob":
            templates.append(manifest["spec"]["submitterPodTemplate"])
            assert 0 < manifest["spec"]["activeDeadlineSeconds"] <= 7 * 86400, path.name
        for template in templates:
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_mlflow_server_recipe_neither_listens_everywhere_unauthenticated_nor_shows_a_password():
    text = (CLUSTER / "README.md").read_text()
    recipe = text.split("mlflow server", 1)[1].split("```", 1)[0]
    assert "0.0.0.0" not in recipe and "--app-name basic-auth" in recipe
    assert not re.search(r"://[^/\s@]+:[^/\s@]+@", recipe)  # no user:password in the database URI


def test_the_installed_ray_is_the_tested_one_and_has_every_private_name_sr_tune_uses():
    assert ray.__version__.rsplit(".", 1)[0] == TESTED_RAY, (
        f"sr_tune is tested on Ray {TESTED_RAY}.x, this is {ray.__version__}: check each of "
        f"sr_tune.local_ray.RAY_PRIVATE_NAMES ({', '.join(RAY_PRIVATE_NAMES)}) on it, then move the pins"
    )
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[default,tune,train]~={TESTED_RAY}.0"' in pyproject
    assert '"torch>=2.6"' in pyproject and '"pillow>=11.3"' in pyproject
    for name in RAY_PRIVATE_NAMES:
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
            try:
                found: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute)
            break
        else:
            raise AssertionError(f"{name}: no module of it imports")


def test_each_trial_attribute_sr_tune_reads_is_on_a_real_tune_trial():
    from ray.tune.experiment import Trial

    from sr_tune.local_ray import TRIAL_PRIVATE_ATTRIBUTES, best_checkpoint, trial_number

    trial = Trial("sr_tune_trial", experiment_tag="3_lr=0.01", stub=True, _setup_default_resource=False)
    for name in TRIAL_PRIVATE_ATTRIBUTES:  # the failure names the Ray internal that moved
        found: object = trial
        for attribute in name.split("."):
            assert hasattr(found, attribute), f"Tune's Trial has no {name} in Ray {ray.__version__}"
            found = getattr(found, attribute)
    assert trial_number(trial) == 3 and best_checkpoint(trial) == (None, {})


def test_the_stop_watch_sees_the_stop_signal_that_ends_tunes_loop():
    """Pins what ``TuneStopWatch`` reads: Tune's loop swaps in its SIGINT handler, which on the signal ends the
    loop and puts back the handler it replaced."""
    from ray.tune.tune import _setup_signal_catching

    from sr_tune.local_ray import TuneStopWatch

    ours = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ended_on_its_own, stopped = TuneStopWatch(), TuneStopWatch()
        _setup_signal_catching()
        ended_on_its_own.loop_running()
        assert not ended_on_its_own.stopped()
        interrupted = _setup_signal_catching()
        stopped.loop_running()
        signal.raise_signal(signal.SIGINT)
        assert interrupted.is_set() and stopped.stopped(), f"Ray {ray.__version__}: Tune's stop signal moved"
        assert not TuneStopWatch().stopped()  # a loop that never stepped was not stopped
    finally:
        signal.signal(signal.SIGINT, ours)
