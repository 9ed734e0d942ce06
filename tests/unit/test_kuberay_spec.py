"""jobs/rayjob.yaml (a KubeRay RayJob): checked against KubeRay 1.7.0's own RayJob CRD with unknown fields as errors,
against the checks KubeRay's operator makes that a CRD cannot express, and against what Ray 2.60's autoscaler v2
does with its two GPU groups when spot capacity runs out."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, ValidationError

from raytrain_app.cli.flags import parse_config
from tests.conftest import REPO_ROOT

RAYJOB_YAML = REPO_ROOT / "jobs" / "rayjob.yaml"
# KubeRay v1.7.0's RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml in ray-project/kuberay,
# Apache-2.0: its LICENSE beside it), gzipped and otherwise unmodified: the check needs nothing outside the repository.
CRD_GZ = REPO_ROOT / "tests" / "fixtures" / "kuberay" / "ray.io_rayjobs.yaml.gz"
CRD_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"
CRD_KUBERAY_VERSION = (1, 7, 0)
IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/raytrain:0.1.0"
CAPACITY_TYPE = "karpenter.sh/capacity-type"
HEAD_MEMORY = "52Gi"  # jobs/rayjob.yaml explains the budget
ALLOCATE_TIMEOUT_ENV = "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"

# The KubeRay release whose RayJob CRD first has each field (read from the CRDs of the tags in ray-project/kuberay).
# A field that is not here is older than all of them (1.3.0).
FIELD_INTRODUCED_IN = {
    "spec.rayClusterSpec.autoscalerOptions.version": (1, 4, 0),
    "spec.deletionStrategy": (1, 5, 0),
    "spec.rayClusterSpec.workerGroupSpecs[].labels": (1, 5, 0),
    "spec.rayClusterSpec.workerGroupSpecs[].resources": (1, 5, 0),
    "spec.rayClusterSpec.authOptions": (1, 5, 1),
    "spec.rayClusterSpec.authOptions.mode": (1, 5, 1),
    "spec.rayClusterSpec.authOptions.secretName": (1, 6, 0),
    "spec.rayClusterSpec.authOptions.enableK8sTokenAuth": (1, 6, 0),
    "spec.preRunningDeadlineSeconds": (1, 6, 0),
    "spec.rayClusterSpec.upgradeStrategy": (1, 6, 0),
    "spec.rayClusterSpec.workerGroupSpecs[].priority": (1, 7, 0),
    "spec.rayClusterSpec.autoscalerOptions.command": (1, 7, 0),
    "spec.rayClusterSpec.autoscalerOptions.args": (1, 7, 0),
    "spec.rayClusterSpec.tlsOptions": (1, 7, 0),
    "spec.rayClusterSpec.networkPolicy": (1, 7, 0),
    "spec.rayClusterSpec.historyServerOptions": (1, 7, 0),
}

# What Kubernetes itself checks of a RayJob's metadata (the CRD says only "object"), with the name rule of KubeRay's
# ValidateRayJobMetadata: a DNS-1035 label of at most 47 characters (the RayCluster gets a 6-character suffix).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 47, "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
# Kubernetes extensions in a structural schema: what they mean for validation.
INT_OR_STRING = "x-kubernetes-int-or-string"  # anyOf integer/string (the CRD spells the anyOf out as well)
PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"  # any field is kept: no additionalProperties: false
CEL_RULES = "x-kubernetes-validations"  # CEL rules, evaluated by the API server only; see the test below
ANNOTATIONS_ONLY = {"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"}  # merge hints


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def crd_text() -> str:
    import gzip
    import hashlib

    raw = gzip.decompress(CRD_GZ.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == CRD_SHA256  # the v1.7.0 file, byte for byte
    return raw.decode()


@functools.cache
def crd_v1_schema() -> dict:
    crd = yaml.load(crd_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(node: dict) -> dict:
    """A copy of a structural schema in which an object schema with `properties` rejects any other field, as the API
    server does with strict field validation (kubectl's default) instead of silently dropping it."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: strict(schema) for name, schema in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(PRESERVE_UNKNOWN):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    if "anyOf" in out:
        out["anyOf"] = [strict(schema) for schema in out["anyOf"]]
    if out.get(INT_OR_STRING) and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def rayjob_validator() -> Draft7Validator:
    schema = strict(crd_v1_schema())
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": "RayJob"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def schema_errors(doc: dict) -> list[ValidationError]:
    return list(rayjob_validator().iter_errors(doc))


def field_paths(node: Any, path: str = "") -> set[str]:
    """The dotted path of every field in a document; list items are `[]`."""
    if isinstance(node, list):
        return set().union(*(field_paths(item, f"{path}[]") for item in node))
    if not isinstance(node, dict):
        return set()
    children = {key: f"{path}.{key}" if path else key for key in node}
    return set(children.values()).union(*(field_paths(node[key], child) for key, child in children.items()))


def schema_keys(schema: dict) -> set[str]:
    keys = {key for key in schema if key.startswith("x-")}
    for name in ("items", "additionalProperties"):
        if isinstance(schema.get(name), dict):
            keys |= schema_keys(schema[name])
    for child in [*schema.get("properties", {}).values(), *schema.get("anyOf", [])]:
        keys |= schema_keys(child)
    return keys


def cel_rule_paths(schema: dict, path: str = "") -> list[str]:
    """Document paths (as `field_paths` writes them) of the fields whose schema carries CEL rules."""
    paths = [path] if CEL_RULES in schema else []
    for name, child in schema.get("properties", {}).items():
        paths += cel_rule_paths(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        paths += cel_rule_paths(schema["items"], f"{path}[]")
    return paths


def at(doc: Any, where: tuple) -> Any:
    for key in where:
        doc = doc[key]
    return doc


def bytes_of(quantity: str | int) -> float:
    number, suffix = re.fullmatch(r"([0-9.]+)([KMGT]i?|)", str(quantity)).groups()
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(number) * scale[suffix]


def groups_by_name(cluster: dict) -> dict[str, dict]:
    return {group["groupName"]: group for group in cluster["workerGroupSpecs"]}


def ray_container(pod_template: dict) -> dict:
    return pod_template["spec"]["containers"][0]  # KubeRay: the Ray container is the first one


# --- the CRD ---------------------------------------------------------------------------------------------------


def test_rayjob_yaml_passes_kuberay_1_7_0_crd_with_unknown_fields_as_errors() -> None:
    assert [error.message for error in schema_errors(load(RAYJOB_YAML))] == []


def test_the_crd_uses_only_kubernetes_extensions_the_check_understands() -> None:
    # A newer CRD with another extension (embedded resources, say) must fail here rather than be half-checked.
    assert schema_keys(crd_v1_schema()) <= {INT_OR_STRING, PRESERVE_UNKNOWN, CEL_RULES, *ANNOTATIONS_ONLY}
    # The CEL rules are left to the API server: none applies to a field this file sets.
    set_paths = field_paths(load(RAYJOB_YAML))
    rule_paths = cel_rule_paths(crd_v1_schema())
    assert "spec.deletionStrategy" in rule_paths  # the search finds them
    assert set_paths.isdisjoint(rule_paths)


SPEC = ("spec",)
CLUSTER = (*SPEC, "rayClusterSpec")
ONDEMAND_POD = (*CLUSTER, "workerGroupSpecs", 1, "template", "spec")


@pytest.mark.parametrize(("where", "key", "wrong"), [
    (SPEC, "backoffLimit", "backofLimit"),
    ((*CLUSTER, "authOptions"), "mode", "mdoe"),
    ((*CLUSTER, "autoscalerOptions"), "version", "versoin"),
    ((*CLUSTER, "workerGroupSpecs", 0), "priority", "priorty"),
    (ONDEMAND_POD, "nodeSelector", "nodeSelecter"),
    ((*ONDEMAND_POD, "containers", 0), "resources", "resource"),
    ((*CLUSTER, "headGroupSpec", "template", "spec", "volumes", 0, "emptyDir"), "sizeLimit", "sizelimit"),
])
def test_a_misspelled_field_anywhere_fails_with_its_name_and_place(where: tuple, key: str, wrong: str) -> None:
    job = load(RAYJOB_YAML)
    section = at(job, where)
    section[wrong] = section.pop(key)
    [error] = schema_errors(job)
    assert f"'{wrong}' was unexpected" in error.message
    assert tuple(error.absolute_path) == where


@pytest.mark.parametrize(("where", "value", "message"), [
    ((*CLUSTER, "authOptions", "mode"), "tokens", "'tokens' is not one of ['disabled', 'token']"),
    ((*CLUSTER, "autoscalerOptions", "version"), "V2", "'V2' is not one of ['v1', 'v2']"),
    ((*CLUSTER, "workerGroupSpecs", 1, "maxReplicas"), "8", "'8' is not of type 'integer'"),
    ((*ONDEMAND_POD, "containers", 0, "resources", "limits", "cpu"), [8], "[8] is not valid under any of"),
    (("metadata", "name"), "raytrain_transformer", "does not match"),
    (("kind",), "RayCluster", "'RayJob' was expected"),
])
def test_a_wrong_value_fails_validation(where: tuple, value: Any, message: str) -> None:
    job = load(RAYJOB_YAML)
    at(job, where[:-1])[where[-1]] = value
    [error] = schema_errors(job)
    assert message in error.message
    assert tuple(error.absolute_path) == where


def test_quantities_take_an_integer_or_a_string() -> None:
    job = load(RAYJOB_YAML)
    limits = at(job, (*ONDEMAND_POD, "containers", 0, "resources", "limits"))
    limits.update({"cpu": 8, "memory": "48Gi"})
    assert schema_errors(job) == []


# --- the job ---------------------------------------------------------------------------------------------------


def test_rayjob_retries_the_same_run_from_object_storage_on_spot_then_on_demand_gpus() -> None:
    job = load(RAYJOB_YAML)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["python", "-m", "raytrain_app.main"]
    cfg, given = parse_config(command[3:])  # every flag is one raytrain_app.main accepts
    assert {"run_name", "save_dir"} <= given  # a pinned run on object storage: each retry resumes it
    assert cfg.save_dir.startswith("s3://") and cfg.use_gpu and cfg.elastic
    assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}  # the operator makes the token and hands it to every pod
    assert cluster["autoscalerOptions"]["version"] == "v2"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["nodeSelector"] == {CAPACITY_TYPE: "on-demand"}
    head_resources = ray_container(head["template"])["resources"]
    assert head_resources["requests"] == head_resources["limits"]
    assert bytes_of(head_resources["limits"]["memory"]) >= bytes_of(HEAD_MEMORY)

    groups = groups_by_name(cluster)
    assert set(groups) == {"gpu-spot", "gpu-ondemand"}
    assert groups["gpu-spot"]["template"]["spec"]["nodeSelector"] == {CAPACITY_TYPE: "spot"}
    assert groups["gpu-ondemand"]["template"]["spec"]["nodeSelector"] == {CAPACITY_TYPE: "on-demand"}
    assert groups["gpu-spot"]["priority"] > groups["gpu-ondemand"].get("priority", 0)
    shapes = []
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        pod = group["template"]["spec"]
        assert "affinity" not in pod  # nothing overrides the capacity type the nodeSelector asks for
        container = ray_container(group["template"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm"}
        shapes.append((container["resources"], group["rayStartParams"], pod["tolerations"], pod["volumes"]))
    assert shapes[0] == shapes[1]  # one shape: the autoscaler can only tell them apart by priority
    assert sum(group["maxReplicas"] for group in groups.values()) >= cfg.num_workers

    pods = [head["template"], *(group["template"] for group in groups.values())]
    assert {container["image"] for pod in pods for container in pod["spec"]["containers"]} == {IMAGE}
    assert {pod["spec"]["serviceAccountName"] for pod in pods} == {"raytrain"}  # IRSA: S3 from every node


def test_head_and_workers_fit_a_64_gib_node_as_karpenter_counts_it() -> None:
    # Karpenter's estimate of a 64-GiB instance's allocatable memory (vmMemoryOverheadPercent 0.075, EKS
    # kube-reserved 255Mi + 11Mi per pod at 234 pods, eviction threshold 100Mi): a pod above it gets a 128-GiB node.
    allocatable = 64 * 2**30 * (1 - 0.075) - (255 + 11 * 234 + 100) * 2**20
    autoscaler_sidecar = 512 * 2**20  # KubeRay's default for the container it adds to the head pod
    cluster = load(RAYJOB_YAML)["spec"]["rayClusterSpec"]
    head = ray_container(cluster["headGroupSpec"]["template"])["resources"]["requests"]
    assert bytes_of(head["memory"]) + autoscaler_sidecar <= allocatable - 2**30  # 1 GiB for DaemonSets
    for group in cluster["workerGroupSpecs"]:
        assert bytes_of(ray_container(group["template"])["resources"]["requests"]["memory"]) <= allocatable - 2**30
    # The head's object store lives on /dev/shm (Ray falls back to slow disk when /dev/shm is smaller).
    [dshm] = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    assert int(cluster["headGroupSpec"]["rayStartParams"]["object-store-memory"]) <= bytes_of(
        dshm["emptyDir"]["sizeLimit"])


def ray_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def operator_errors(job: dict) -> list[str]:
    """What KubeRay 1.7.0's ValidateRayJobSpec/ValidateRayClusterSpec (ray-operator/controllers/ray/utils/validation.go)
    reject in fields this file uses, which the CRD cannot express."""
    cluster = job["spec"]["rayClusterSpec"]
    version = ray_version(cluster.get("rayVersion", "0"))
    v2 = cluster.get("autoscalerOptions", {}).get("version") == "v2"
    errors = []
    if cluster.get("authOptions", {}).get("mode") == "token" and version < (2, 52, 0):
        errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    if cluster.get("authOptions", {}).get("enableK8sTokenAuth"):
        errors.append("K8s token auth mode is currently not supported for RayJob")
    for group in cluster["workerGroupSpecs"]:
        if group.get("priority", 0) and (version < (2, 56, 0) or not v2):
            errors.append(f"worker group {group['groupName']}: priority needs Ray >= 2.56.0 and autoscaler v2")
    for pod in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        if v2 and pod["spec"].get("restartPolicy", "Never") != "Never":
            errors.append("restartPolicy should be Never or unset when using autoscaler V2")
    head_env = {e["name"] for e in ray_container(cluster["headGroupSpec"]["template"]).get("env", [])}
    if "RAY_enable_autoscaler_v2" in head_env and "version" in cluster.get("autoscalerOptions", {}):
        errors.append("both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set")
    return errors


def test_the_operator_accepts_the_job() -> None:
    assert operator_errors(load(RAYJOB_YAML)) == []


@pytest.mark.parametrize(("where", "value", "message"), [
    ((*CLUSTER, "rayVersion"), "2.50.0", "minimum Ray version is 2.52.0"),
    ((*CLUSTER, "autoscalerOptions", "version"), "v1", "worker group gpu-spot: priority needs"),
    ((*CLUSTER, "authOptions", "enableK8sTokenAuth"), True, "not supported for RayJob"),
    ((*ONDEMAND_POD, "restartPolicy"), "Always", "restartPolicy should be Never"),
])
def test_the_operator_check_refuses_what_kuberay_refuses(where: tuple, value: Any, message: str) -> None:
    job = load(RAYJOB_YAML)
    at(job, where[:-1])[where[-1]] = value
    assert any(message in error for error in operator_errors(job)), operator_errors(job)


def test_header_names_the_kuberay_release_every_field_needs() -> None:
    text = RAYJOB_YAML.read_text()
    [named] = re.findall(r"KubeRay operator >= (\d+\.\d+\.\d+)", text)
    needed = max(FIELD_INTRODUCED_IN.get(path, (1, 3, 0)) for path in field_paths(yaml.safe_load(text)))
    assert needed <= ray_version(named) <= CRD_KUBERAY_VERSION  # not older than a field, not newer than checked
    assert needed == (1, 7, 0)  # workerGroupSpecs[].priority


# --- spot, then on-demand: Ray 2.60's autoscaler v2 on this file's groups ------------------------------------------


def allocate_timeout_s(cluster: dict) -> int:
    env = {e["name"]: e["value"] for e in cluster["autoscalerOptions"]["env"]}
    return int(env[ALLOCATE_TIMEOUT_ENV])


def test_ray_reads_the_allocate_timeout_the_job_gives_the_autoscaler_container() -> None:
    value = allocate_timeout_s(load(RAYJOB_YAML)["spec"]["rayClusterSpec"])
    assert 300 <= value < 3600  # a new GPU node and a cold image pull fit; Ray's default (an hour) is replaced
    probe = "from ray.autoscaler.v2.instance_manager.config import InstanceReconcileConfig as C;" \
            "print(C().allocate_status_timeout_s)"
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, ALLOCATE_TIMEOUT_ENV: str(value)},
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == [str(value)]


class PendingSpotPods:
    """KubeRay as Ray's autoscaler v2 sees it: a launch adds worker pods; no spot capacity, so none ever runs."""

    def __init__(self) -> None:
        from ray.autoscaler.v2.instance_manager.node_provider import CloudInstance
        from ray.core.generated.instance_manager_pb2 import NodeKind

        self.instance, self.worker = CloudInstance, NodeKind.WORKER
        self.pods = {"head": CloudInstance("head", "headgroup", NodeKind.HEAD, True)}
        self.launched = 0

    def get_non_terminated(self) -> dict:
        return dict(self.pods)

    def poll_errors(self) -> list:
        return []

    def terminate(self, ids: list[str], request_id: str) -> None:
        for pod in ids:
            self.pods.pop(pod)

    def launch(self, shape: dict[str, int], request_id: str) -> None:
        for group, count in shape.items():
            for _ in range(count):
                self.launched += 1
                name = f"{group}-{self.launched}"
                self.pods[name] = self.instance(name, group, self.worker, False, request_id)

    def workers(self) -> Counter:
        return Counter(pod.node_type for pod in self.pods.values() if pod.node_kind == self.worker)


def test_pending_spot_pods_are_given_up_after_the_timeout_and_on_demand_pods_launched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig, InstanceReconcileConfig
    from ray.autoscaler.v2.instance_manager.instance_manager import InstanceManager
    from ray.autoscaler.v2.instance_manager.instance_storage import InstanceStorage
    from ray.autoscaler.v2.instance_manager.reconciler import Reconciler
    from ray.autoscaler.v2.instance_manager.storage import InMemoryStorage
    from ray.autoscaler.v2.instance_manager.subscribers.cloud_instance_updater import CloudInstanceUpdater
    from ray.autoscaler.v2.instance_manager.subscribers.cloud_resource_monitor import CloudResourceMonitor
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler
    from ray.core.generated import autoscaler_pb2 as pb

    cluster = load(RAYJOB_YAML)["spec"]["rayClusterSpec"]
    ray_cr = {"metadata": {"name": "raytrain", "namespace": "default"}, "spec": cluster}  # what the autoscaler reads
    config = AutoscalingConfig(_derive_autoscaling_config_from_ray_cr(ray_cr), skip_content_hash=True)
    timeout_s = allocate_timeout_s(cluster)  # the env var sets this default (test above)
    monkeypatch.setattr(config, "get_instance_reconcile_config",
                        lambda: InstanceReconcileConfig(allocate_status_timeout_s=timeout_s))
    pods, monitor = PendingSpotPods(), CloudResourceMonitor()
    instances = InstanceManager(InstanceStorage("raytrain", InMemoryStorage()), [CloudInstanceUpdater(pods), monitor])
    head = pb.NodeState(node_id=b"h" * 28, instance_id="head", ray_node_type_name="headgroup",
                        status=pb.NodeStatus.RUNNING, total_resources={"node:__internal_head__": 1})
    # Ray Train's elastic policy asks for its maximum (8 workers of 1 GPU) as a cluster resource constraint.
    worker = pb.ResourceRequest(resources_bundle={"GPU": 1, "CPU": 1})
    demand = pb.ClusterResourceConstraint(resource_requests=[pb.ResourceRequestByCount(request=worker, count=8)])
    state = pb.ClusterResourceState(node_states=[head], cluster_resource_constraints=[demand])

    # The autoscaler reconciles every few seconds: the pods it asked for at 0 s exist (Pending) at 5 s, and the
    # timeout runs from then.
    start_s, start_ns = time.time(), time.time_ns()
    for elapsed_s, workers in [(0, {"gpu-spot": 8}), (5, {"gpu-spot": 8}), (5 + timeout_s - 1, {"gpu-spot": 8}),
                               (5 + timeout_s + 1, {"gpu-ondemand": 8}), (5 + timeout_s + 60, {"gpu-ondemand": 8})]:
        monkeypatch.setattr(time, "time", lambda s=elapsed_s: start_s + s)
        monkeypatch.setattr(time, "time_ns", lambda s=elapsed_s: start_ns + s * 10**9)
        Reconciler.reconcile(instances, ResourceDemandScheduler(), pods, monitor, state, pods.get_non_terminated(),
                             config)
        assert pods.workers() == workers, elapsed_s
    assert pods.launched == 16  # the 8 spot pods were deleted, not kept beside the on-demand ones
