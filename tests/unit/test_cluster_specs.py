"""The cluster definitions users launch: cluster.yaml (Ray's autoscaler, checked by Ray's own validation and each
node type's EC2 launch request by botocore's model), the image (jobs/Dockerfile) and the instance profiles'
policies (jobs/aws/) it relies on, jobs/rayjob.yaml (KubeRay) and jobs/runtime_env.yaml; and the submit helper's
checks before it submits."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from jsonschema import ValidationError

from raytrain_app.cli.flags import parse_config
from raytrain_app.jobs import main as jobs_main
from tests.conftest import REPO_ROOT
from tests.helpers import run_in_process

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
RAYJOB_YAML = REPO_ROOT / "jobs" / "rayjob.yaml"
RUNTIME_ENV_YAML = REPO_ROOT / "jobs" / "runtime_env.yaml"
DOCKERFILE = REPO_ROOT / "jobs" / "Dockerfile"
AWS_DIR = REPO_ROOT / "jobs" / "aws"
HADOLINT = Path(sys.executable).with_name("hadolint")
# The AMI every node boots (cluster.yaml): AWS's Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04), through
# its public SSM parameter, or the ami-... id a user pinned.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
# The local folder that holds the cluster's token (file_mounts ships it to every node; the docs tell users to make it).
TOKEN_DIR = "~/.ray/raytrain_cluster"


def validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_passes_rays_autoscaler_validation_and_holds_what_the_readme_promises() -> None:
    config = load(CLUSTER_YAML)
    prepared = validate(config)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}  # no training on the head
    start_head = " ".join(prepared["head_start_ray_commands"])
    assert "--num-cpus=0" in start_head and "--num-gpus=0" in start_head
    assert "--dashboard-host=127.0.0.1" in start_head  # the job API only through the SSH tunnel
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert set(workers) == {"gpu_spot", "gpu_ondemand"}
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] > 0 and t["resources"]["GPU"] >= 1
    assert workers["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in workers["gpu_ondemand"]["node_config"]
    # On a tie the autoscaler launches the higher priority (v2) or the name that sorts last (v1): spot first.
    assert sorted(workers)[-1] == "gpu_spot"
    assert workers["gpu_spot"]["priority"] > workers["gpu_ondemand"]["priority"]
    # The project's image from the cluster's own region's ECR, pulled with a login on each host first.
    registry, repository, tag = image_parts(prepared["docker"]["image"])
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.us-west-2\.amazonaws\.com", registry) and repository == "raytrain" and tag
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["initialization_commands"] == [
        f"aws ecr get-login-password --region us-west-2 | docker login --username AWS --password-stdin {registry}"]
    # Nothing installed at boot (left out, Ray's AWS defaults would pip-install boto3 on the head), no code mounted.
    assert prepared["setup_commands"] == prepared["head_setup_commands"] == prepared["worker_setup_commands"] == []
    assert prepared["file_mounts"] == {"/home/ray/raytrain_cluster": TOKEN_DIR}
    assert "IpPermissions" not in prepared["provider"].get("security_group", {})  # no extra ports opened


# Ray checks the schema with jsonschema; the docker section's image it checks itself, with an assert.
@pytest.mark.parametrize(("where", "key", "error", "message"), [
    ((), "idle_timeout_minutes", ValidationError, "'idle_timeout_minute' was unexpected"),
    (("available_node_types", "gpu_spot"), "max_workers", ValidationError, "'max_worker' was unexpected"),
    (("available_node_types", "head"), "node_config", ValidationError, "'node_config' is a required property"),
    (("docker",), "image", AssertionError, "Must provide a container & image name"),
])
def test_a_misspelled_field_fails_validation(where: tuple[str, ...], key: str, error: type[Exception],
                                             message: str) -> None:
    config = load(CLUSTER_YAML)
    section = config
    for name in where:
        section = section[name]
    section[key[:-1]] = section.pop(key)  # drop the last letter
    with pytest.raises(error, match=message):
        validate(config)


# --- What each node type's launch sends EC2 --------------------------------------------------------------------------

def image_parts(image: str) -> tuple[str, str, str]:
    """(registry, repository, tag) of an image name: 123456789012.dkr.ecr.us-west-2.amazonaws.com/raytrain:0.1.0."""
    registry, _, rest = image.partition("/")
    repository, _, tag = rest.rpartition(":")
    return registry, repository, tag


def launch_requests(config: dict) -> dict[str, dict]:
    """The RunInstances request of each node type, as Ray 2.60 sends it: Ray's own AWS node provider
    (`AWSNodeProvider.create_node`) builds it from the prepared node_config plus what `bootstrap_aws` adds (a subnet,
    the security group, the key pair), and it goes to a recording stand-in for boto3's EC2 resource instead of AWS."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import TAG_RAY_LAUNCH_CONFIG, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    prepared = validate(config)
    provider = AWSNodeProvider(prepared["provider"], prepared["cluster_name"])
    sent: list[dict] = []

    def create_instances(**request: Any) -> list[SimpleNamespace]:
        sent.append(request)
        return [SimpleNamespace(id="i-0", instance_id="i-0", state={"Name": "pending"}, state_reason=None)]

    provider.ec2_fail_fast = SimpleNamespace(create_instances=create_instances)
    requests = {}
    for name, node_type in prepared["available_node_types"].items():
        bootstrapped = {**node_type["node_config"], "SubnetIds": ["subnet-0123456789abcdef0"],
                        "SecurityGroupIds": ["sg-0123456789abcdef0"], "KeyName": "ray-autoscaler_us-west-2"}
        kind = "head" if name == prepared["head_node_type"] else "worker"
        provider.create_node(bootstrapped, {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: name,
                                            TAG_RAY_LAUNCH_CONFIG: "0"}, 1)
        requests[name] = sent.pop()
    return requests


def run_instances_errors(request: dict) -> str:
    """botocore's report of what in `request` its model of EC2 RunInstances rejects; empty when nothing."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate(request, shape)
    return report.generate_report() if report.has_errors() else ""


def test_every_node_type_launches_with_a_request_ec2_accepts() -> None:
    requests = launch_requests(load(CLUSTER_YAML))
    assert set(requests) == {"head", "gpu_spot", "gpu_ondemand"}
    errors = {name: run_instances_errors(request) for name, request in requests.items()}
    assert errors == {name: "" for name in requests}
    assert all(request["MinCount"] == request["MaxCount"] == 1 for request in requests.values())


@pytest.mark.parametrize(("change", "message"), [
    (lambda nc: nc.update(InstanceTyp=nc.pop("InstanceType")), 'Unknown parameter in input: "InstanceTyp"'),
    (lambda nc: nc["BlockDeviceMappings"][0]["Ebs"].update(VolumeSize="200"),
     "Invalid type for parameter BlockDeviceMappings[0].Ebs.VolumeSize"),
    (lambda nc: nc.update(IamInstanceProfile="raytrain-worker"), "Invalid type for parameter IamInstanceProfile"),
])
def test_the_launch_request_check_rejects_a_misspelled_or_mistyped_field(change: Any, message: str) -> None:
    config = load(CLUSTER_YAML)
    change(config["available_node_types"]["gpu_spot"]["node_config"])
    errors = {name: run_instances_errors(request) for name, request in launch_requests(config).items()}
    assert message in errors["gpu_spot"] and errors["gpu_ondemand"] == ""


def test_every_node_boots_one_gpu_image_and_gets_its_own_instance_profile() -> None:
    types = validate(load(CLUSTER_YAML))["available_node_types"]
    [image_id] = {t["node_config"]["ImageId"] for t in types.values()}
    assert image_id == f"resolve:ssm:{DLAMI_PARAMETER}" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image_id)
    assert CLUSTER_YAML.read_text().count(image_id) == 1  # one anchor: pinning it changes every node type
    profiles = {name: t["node_config"]["IamInstanceProfile"] for name, t in types.items()}
    assert profiles == {"head": {"Name": "raytrain-head"}, "gpu_spot": {"Name": "raytrain-worker"},
                        "gpu_ondemand": {"Name": "raytrain-worker"}}


# --- The instance profiles' policies (jobs/aws/) ---------------------------------------------------------------------

def policy(name: str) -> dict:
    document = json.loads((AWS_DIR / name).read_text())
    assert document["Version"] == "2012-10-17"
    return document


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def grants(document: dict, action: str) -> list[Any]:
    """The Resource of each statement of `document` that allows `action` (named exactly or by a wildcard)."""
    return [s["Resource"] for s in document["Statement"] if s["Effect"] == "Allow"
            and any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), action) for a in as_list(s["Action"]))]


def test_every_instance_profile_may_use_the_bucket_and_pull_the_image_and_no_more() -> None:
    prepared = validate(load(CLUSTER_YAML))
    registry, repository, _ = image_parts(prepared["docker"]["image"])
    account, region = registry.split(".")[0], prepared["provider"]["region"]
    trust = policy("ec2-trust-policy.json")["Statement"]
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    worker, head = policy("worker-policy.json"), policy("head-policy.json")
    for document in (worker, head):
        # Ray Train writes checkpoints (multipart for large files), lists them and deletes those num_to_keep drops.
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
            assert grants(document, action) == ["arn:aws:s3:::my-bucket/*"], action
        assert grants(document, "s3:ListBucket") == ["arn:aws:s3:::my-bucket"]
        s3_resources = {r for s in document["Statement"] if any(a.startswith("s3:") for a in as_list(s["Action"]))
                        for r in as_list(s["Resource"])}
        assert sorted(s3_resources) == ["arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"]
        assert grants(document, "ecr:GetAuthorizationToken") == ["*"]
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
            assert grants(document, action) == [f"arn:aws:ecr:{region}:{account}:repository/{repository}"], action
    # The head may do what a worker does, and more; a worker only reads and writes the bucket and pulls the image.
    assert worker["Statement"] == head["Statement"][:len(worker["Statement"])]
    assert {a.split(":")[0] for s in worker["Statement"] for a in as_list(s["Action"])} == {"s3", "ecr"}
    # One account and one bucket everywhere: the placeholders users replace (docs, jobs/rayjob.yaml).
    texts = [CLUSTER_YAML.read_text(), RAYJOB_YAML.read_text()] + [p.read_text() for p in AWS_DIR.glob("*.json")]
    assert set(re.findall(r"(?<![\d.])\d{12}(?![\d.])", "\n".join(texts))) == {account} == {"123456789012"}
    assert set(re.findall(r"(?:s3://|arn:aws:s3:::)([a-z0-9][a-z0-9.-]*)", "\n".join(texts))) == {"my-bucket"}


def test_the_head_may_launch_tag_and_end_this_clusters_workers_and_pass_them_only_their_role() -> None:
    prepared = validate(load(CLUSTER_YAML))
    account = prepared["docker"]["image"].split(".")[0]
    head = policy("head-policy.json")
    # Ray's AWS node provider (node_provider.py) launches (create_instances), lists (instances.filter), tags
    # (create_tags) and ends (terminate_instances) workers; nothing else on the head calls EC2.
    for action in ("ec2:RunInstances", "ec2:DescribeInstances", "ec2:CreateTags", "ec2:TerminateInstances"):
        assert grants(head, action), action
    worker_profile = prepared["available_node_types"]["gpu_spot"]["node_config"]["IamInstanceProfile"]["Name"]
    assert grants(head, "iam:PassRole") == [f"arn:aws:iam::{account}:role/{worker_profile}"]
    [terminate] = [s for s in head["Statement"] if s["Action"] == "ec2:TerminateInstances"]
    assert terminate["Condition"]["StringEquals"] == {"aws:ResourceTag/ray-cluster-name": prepared["cluster_name"],
                                                      "aws:ResourceTag/ray-node-type": "worker"}
    for action in ("iam:CreateRole", "iam:AttachRolePolicy", "ec2:ModifyInstanceAttribute", "s3:DeleteBucket"):
        assert not grants(head, action), action


# --- Token authentication on every node ------------------------------------------------------------------------------

def docker_run(prepared: dict, node: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The environment, bind mounts (container path: host path) and words of the `docker run` that Ray's
    DockerCommandRunner starts each node's container with (`docker_start_cmds`): `ray start`, Ray's processes and
    every `ray exec` shell run in that container with its environment."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = prepared["docker"]
    options = docker["run_options"] + docker.get(f"{node}_run_options", [])
    words = shlex.split(docker_start_cmds("ubuntu", docker["image"], prepared["file_mounts"],
                                          docker["container_name"], options, prepared["cluster_name"],
                                          "/home/ray", "docker"))
    pairs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-e", "--env")]
    mounts = [words[i + 1].split(":") for i, w in enumerate(words[:-1]) if w == "-v"]
    return dict(p.split("=", 1) for p in pairs), {dst: src for src, dst in mounts}, words


@pytest.mark.parametrize("node", ["head", "worker"])
def test_every_container_runs_ray_with_token_auth_and_the_token_from_the_users_machine(node: str) -> None:
    prepared = validate(load(CLUSTER_YAML))
    env, mounts, words = docker_run(prepared, node)
    assert env["RAY_AUTH_MODE"] == "token"
    token_dir, token_file = env["RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)
    assert token_dir in mounts and token_file == "auth_token"  # a bind-mounted folder: docker sees a new token
    assert prepared["file_mounts"][token_dir] == TOKEN_DIR
    start_commands = prepared[f"{node}_start_ray_commands"]
    assert any("ray start" in c for c in start_commands) and not any("RAY_AUTH" in c for c in start_commands)
    assert ("--gpus" in words) == (node == "worker")


@pytest.mark.parametrize("token", [True, False])
def test_with_the_containers_auth_mode_ray_start_refuses_to_run_without_the_token(tmp_path: Path,
                                                                                  token: bool) -> None:
    """What `ray start` checks first (scripts.py: maybe_enable_token_auth_if_token_available, then
    ensure_token_if_auth_enabled without creating one), in a fresh process with the container's auth variables."""
    env, _, _ = docker_run(validate(load(CLUSTER_YAML)), "worker")
    token_path = tmp_path / Path(env["RAY_AUTH_TOKEN_PATH"]).name
    if token:
        token_path.write_text("0" * 64 + "\n")
    code = ("from ray._private.authentication.authentication_token_setup import "
            "ensure_token_if_auth_enabled as ensure, maybe_enable_token_auth_if_token_available as enable\n"
            "assert enable()\nensure(None, create_token_if_missing=False)\nprint('token auth on')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**without_ray_settings(os.environ), "HOME": str(tmp_path),
                                 "RAY_AUTH_MODE": env["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN_PATH": str(token_path)})
    if token:
        assert result.returncode == 0 and result.stdout.strip() == "token auth on", result.stderr
    else:
        assert result.returncode != 0 and "RAY_AUTH_TOKEN_PATH is set but file cannot be opened" in result.stderr
    assert not (tmp_path / ".ray").exists()  # nothing made a token of its own


def without_ray_settings(environ: Any) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith("RAY_")}


# --- The image (jobs/Dockerfile) -------------------------------------------------------------------------------------

def test_the_cluster_and_the_rayjob_run_the_same_image() -> None:
    def images(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [c["image"] for c in node.get("containers", [])]
            return found + [i for k, v in node.items() if k != "containers" for i in images(v)]
        return [i for v in node for i in images(v)] if isinstance(node, list) else []

    rayjob_images = images(load(RAYJOB_YAML))
    assert rayjob_images and set(rayjob_images) == {load(CLUSTER_YAML)["docker"]["image"]}


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (`name==V` or `name[extras]==V`)."""
    pattern = rf"{re.escape(name)}(?:\[[^]]*\])?==(\S+)"
    [version] = [m.group(1) for d in pyproject()["dependencies"] if (m := re.fullmatch(pattern, d))]
    return version


def dockerfile_instructions() -> list[list[str]]:
    """jobs/Dockerfile's instructions, continuation lines joined, comments left out, each split into words."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_is_built_on_rays_image_of_the_pinned_version() -> None:
    instructions = dockerfile_instructions()
    [base] = [i[1].split("=", 1)[1] for i in instructions if i[0] == "ARG" and i[1].startswith("RAY_IMAGE=")]
    assert base == f"rayproject/ray:{pin('ray')}-py311-gpu"
    assert {i[1] for i in instructions if i[0] == "FROM"} == {"${RAY_IMAGE}"}


def test_the_image_installs_pyprojects_dependencies_then_the_package_alone() -> None:
    instructions = dockerfile_instructions()
    # The RUN that lists the dependencies, run as the image's build runs it (in the folder pyproject.toml is in).
    [run] = [i for i in instructions if i[0] == "RUN" and "tomllib" in " ".join(i)]
    listed = subprocess.run([sys.executable, "-c", run[run.index("-c") + 1]], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == pyproject()["dependencies"] + ["boto3"] and f"torch=={pin('torch')}" in listed
    from_context = [[w for w in i[1:] if not w.startswith("--")] for i in instructions
                    if i[0] == "COPY" and not any(w.startswith("--from=") for w in i)]
    assert {src for *sources, _ in from_context for src in sources} == {"pyproject.toml", "raytrain_app"}
    installs = [" ".join(i) for i in instructions if i[0] == "RUN" and "pip install" in " ".join(i)]
    assert installs == ["RUN pip install --no-cache-dir -r /tmp/raytrain/requirements.txt",
                        "RUN pip install --no-cache-dir --no-deps /tmp/raytrain/wheels/*.whl"]


def test_the_package_alone_builds_installs_and_runs_from_the_images_build_context(tmp_path: Path, pip) -> None:
    """What the image's build stage does, on this machine: a wheel built from only the two things the Dockerfile
    copies (and .dockerignore lets through), installed without deps and not editable, holds every module of the
    package and nothing else, and its commands run from it."""
    import shutil
    import zipfile

    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", context)
    shutil.copytree(REPO_ROOT / "raytrain_app", context / "raytrain_app", ignore=shutil.ignore_patterns("__pycache__"))
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "wheels"), str(context))
    [wheel] = (tmp_path / "wheels").glob("raytrain_app-*.whl")
    modules = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "raytrain_app").rglob("*.py")}
    assert modules == expected
    site = tmp_path / "site"
    pip("install", "--quiet", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    result = subprocess.run([sys.executable, "-m", "raytrain_app.main", "--help"], cwd=tmp_path, text=True,
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 0 and "--resume-from-checkpoint" in result.stdout, result.stderr
    check = ("import raytrain_app.main, raytrain_app.ray_adapter.joining as j; print(j.__file__)")
    located = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, text=True, capture_output=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert located.stdout.strip().startswith(str(site)), located.stderr  # the installed copy, not this tree


def hadolint(dockerfile: Path) -> tuple[int, list[dict]]:
    result = subprocess.run([str(HADOLINT), "--no-color", "-f", "json", str(dockerfile)], capture_output=True,
                            text=True, timeout=60, cwd=REPO_ROOT)
    return result.returncode, json.loads(result.stdout or "[]")


def test_the_dockerfile_passes_hadolint() -> None:
    assert hadolint(DOCKERFILE) == (0, [])


def test_hadolint_flags_a_pip_install_that_keeps_its_cache(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:2.60.0-py311-gpu\nRUN pip install -r requirements.txt\n")
    code, findings = hadolint(bad)
    assert code != 0 and [(f["code"], f["line"]) for f in findings] == [("DL3042", 2)]


def test_only_pyproject_names_the_torch_version() -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    version, naming = pin("torch"), []
    for name in filter(None, listed):
        path = REPO_ROOT / name
        data = path.read_bytes() if path.is_file() and path.stat().st_size < 1_000_000 else b"\0"
        if b"\0" not in data and any("torch" in line.lower() and version in line
                                     for line in data.decode(errors="replace").splitlines()):
            naming.append(name)
    assert naming == ["pyproject.toml"]


def test_runtime_env_lets_the_driver_save_on_stop() -> None:
    env = load(RUNTIME_ENV_YAML)
    assert env["working_dir"] == "."
    assert env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values


def test_a_job_uploads_the_package_and_leaves_tests_docs_and_benchmarks_behind(tmp_path: Path) -> None:
    """The archive Ray's own packaging makes of this repository as a job's working_dir, with the excludes of
    jobs/runtime_env.yaml alone (Ray's default excludes and .gitignore switched off, as
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 and RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES='' do): every file of the
    package, no folder but the package's, no bytecode."""
    import zipfile

    from ray._private.runtime_env.packaging import _get_excludes, _zip_files

    excludes = load(RUNTIME_ENV_YAML)["excludes"]
    archive = tmp_path / "working_dir.zip"
    _zip_files(str(REPO_ROOT), excludes, str(archive), include_gitignore=False)
    uploaded = set(zipfile.ZipFile(archive).namelist())
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    package = {name for name in tracked if name.startswith("raytrain_app/")}
    assert len(package) > 50 and package <= uploaded
    # Of the repository's own files, those of no folder but the package and the example models a job may name with
    # --model (whatever else a checkout holds is judged by the paths below).
    assert {name.split("/")[0] for name in uploaded & tracked if "/" in name} == {"raytrain_app", "examples"}
    assert not [name for name in uploaded if "__pycache__" in name or name.endswith(".pyc")]
    # Ray's own matcher on paths this checkout may not have: local state, wheels, caches.
    skipped = _get_excludes(REPO_ROOT, excludes)
    for path in ("tests/unit/test_config.py", "docs/cli.md", "benchmarks/recovery.py", "jobs/Dockerfile",
                 "data/demo.pkl", "checkpoints/run-x/best_model.pt", "wandb/latest-run", ".git/HEAD",
                 ".venv/bin/python", ".mypy_cache/x.json", ".env", "click-8.5.1-py3-none-any.whl",
                 "raytrain_app/core/__pycache__/model.pyc"):
        assert skipped(REPO_ROOT / path), path
    for path in ("raytrain_app/main.py", "raytrain_app/datasets/parquet.py", "train.yaml",  # a --config file
                 "examples/conv_classifier/model.py", "my_models/model.py"):  # models of --model
        assert not skipped(REPO_ROOT / path), path


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "d.pkl"], "--save-dir ./checkpoints: a job runs in a fresh copy of the working directory"),
    (["--data", "d.pkl", "--save-dir", "ckpts"], "--save-dir ckpts: a job runs in a fresh copy"),
    (["--data", "d.pkl", "--save-dir", "/abs", "--num-workers", "3-1"], "--num-workers 3-1: the range must be"),
    (["--data", "d.pkl", "--save-dir", "/abs", "--lr", "0"], "--lr must be positive"),
    ([], "nothing to submit"),
    (["--data", "d.pkl", "--save-dir", "/abs"], "cannot reach the Ray job API at http://127.0.0.1:9"),
])
def test_submit_refuses_what_cannot_work_with_one_line_before_submitting(args: list[str], message: str) -> None:
    # The address points nowhere: a bad command is refused before the helper tries it.
    result = run_in_process(jobs_main, ["submit", "--address", "http://127.0.0.1:9", "--", *args])
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: ") and message in line


def test_submit_pins_the_run_or_sweep_name_every_attempt_continues() -> None:
    from raytrain_app.cli.flags import parse_sweep_config
    from raytrain_app.core.config import sweep_identity_hash
    from raytrain_app.jobs import plan_entry

    train = ["--data", "/d.pkl", "--save-dir", "s3://bucket/ckpt", "--epochs", "3"]
    entry = plan_entry(train, sweep=False)
    name = parse_config(train)[0].default_run_name()
    assert (entry.module, entry.run, entry.args) == ("raytrain_app.main", name, [*train, "--run-name", name])
    assert entry.entrypoint() == shlex.join(["python", "-m", "raytrain_app.main", *entry.args])
    assert plan_entry([*train, "--run-name", "mine"], sweep=False).args == [*train, "--run-name", "mine"]

    sweep = ["--base-checkpoint", "/b.pt", "--lr-grid", "1e-4,1e-3", *train]
    entry = plan_entry(sweep, sweep=True)
    sweep_cfg, cfg, _ = parse_sweep_config(sweep)
    name = f"sweep-{sweep_identity_hash(sweep_cfg, cfg)}"  # the name raytrain_app.tune gives it
    assert (entry.module, entry.run, entry.args) == ("raytrain_app.tune", name, [*sweep, "--sweep-name", name])


def test_submit_from_outside_the_repository_refuses_to_upload_the_wrong_folder(tmp_path: Path) -> None:
    result = run_in_process(jobs_main, ["submit", "--address", "http://127.0.0.1:9", "--", "--data", "/d.pkl",
                                        "--save-dir", "/abs"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (f"error: the runtime env's working_dir '.' is {tmp_path}, which does not hold raytrain_app/: "
                    "run this command from the repository root")


@pytest.mark.parametrize(("status", "exit_code", "retried"), [
    ("SUCCEEDED", 0, False), ("STOPPED", 130, False), ("FAILED", 2, False), ("FAILED", 3, False),
    ("FAILED", 1, True), ("FAILED", -9, True), ("FAILED", 143, True),
])
def test_the_helper_resubmits_only_what_another_attempt_can_finish(status: str, exit_code: int, retried: bool) -> None:
    """A refused command (2) and a diverged run (3) would only repeat; a killed or failed driver continues."""
    from types import SimpleNamespace

    from raytrain_app.jobs import _final_outcome

    info = SimpleNamespace(status=SimpleNamespace(value=status), driver_exit_code=exit_code, error_type=None)
    assert (_final_outcome(info, "run-x") is None) == retried
    if status == "FAILED" and exit_code == 3:
        assert _final_outcome(info, "run-x")[1] == 3 and "diverged" in _final_outcome(info, "run-x")[0]
