"""The commands the cluster docs tell a user to copy (docs/cloud.md, docs/cluster-and-jobs.md) match the files they
act on: launch, tunnel, submit, follow, stop and tear down name cluster.yaml and jobs/rayjob.yaml as they are; the
image built and pushed is the one the nodes run; the IAM roles are the profiles the nodes get; the token is where
the nodes and the clients look; every training command parses as `python -m raytrain_app.main` does."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raytrain_app.cli.flags import parse_config, parse_sweep_config
from tests.conftest import REPO_ROOT

DOCS = {name: REPO_ROOT / "docs" / name for name in ("cloud.md", "cluster-and-jobs.md")}
CLUSTER = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
RAYJOB_TEXT = (REPO_ROOT / "jobs" / "rayjob.yaml").read_text()
RAYJOB = yaml.safe_load(RAYJOB_TEXT)
REMOTE_TOKEN_FOLDER = "/home/ray/raytrain_cluster"  # where cluster.yaml mounts the token folder on every node
# What the docs' shell variables stand for in the files, which hold the example account and bucket.
VARIABLES = {"$ACCOUNT": "123456789012", "$BUCKET": "my-bucket", "$HOME": "~"}


def shell_commands(markdown: str) -> list[list[str]]:
    """Every simple command in the ```bash blocks, as words: continuation lines joined, comments dropped, pipelines,
    `&&`, `;` and `&` split, each `$(...)` its own command (its place in the outer one holds `{subst}`), and a
    `for VAR in A B; do ...; done` loop unrolled with `$VAR` and `${VAR#prefix}` put in."""
    commands: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        text = block.replace("\\\n", " ")
        text = re.sub(r"for (\w+) in ([^;\n]+); do\n(.*?)\ndone", _unroll, text, flags=re.S)
        for line in text.splitlines():
            while (inner := re.search(r"\$\(([^()]*)\)", line)) is not None:
                commands.extend(_split(inner.group(1)))
                line = line[:inner.start()] + "{subst}" + line[inner.end():]
            commands.extend(_split(line))
    return [[_substitute(word) for word in command] for command in commands]


def _unroll(loop: re.Match) -> str:
    var, values, body = loop.groups()
    out = []
    for value in values.split():
        text = re.sub(r"\$\{" + var + r"#([^}]*)\}", lambda m, v=value: v.removeprefix(m.group(1)), body)
        out.append(re.sub(r"\$" + var + r"\b", value, text))
    return "\n".join(out)


def _split(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def _substitute(word: str) -> str:
    for name, value in VARIABLES.items():
        word = word.replace(name, value)
    return word


def commands_in(doc: str) -> list[list[str]]:
    return shell_commands(DOCS[doc].read_text())


def after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def rayjob_images() -> set[str]:
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return {c["image"] for t in templates for c in t["spec"]["containers"]}


def test_the_command_reader_reads_what_a_shell_would() -> None:
    text = ("```bash\nexport A=$(aws sts get-caller-identity --query Account) B=x  # note\n"
            "for r in raytrain-worker raytrain-head; do\n  aws iam x --f file://a/${r#raytrain-}.json --n $r\ndone\n"
            "ray dashboard c.yaml &\nkubectl get x $(kubectl get y -o $(echo z)) | base64 -d && echo \\\n  done\n```\n")
    assert shell_commands(text) == [
        ["aws", "sts", "get-caller-identity", "--query", "Account"], ["export", "A={subst}", "B=x"],
        ["aws", "iam", "x", "--f", "file://a/worker.json", "--n", "raytrain-worker"],
        ["aws", "iam", "x", "--f", "file://a/head.json", "--n", "raytrain-head"],
        ["ray", "dashboard", "c.yaml"],
        ["echo", "z"], ["kubectl", "get", "y", "-o", "{subst}"], ["kubectl", "get", "x", "{subst}"],
        ["base64", "-d"], ["echo", "done"]]


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_step_of_the_ec2_cluster_names_cluster_yaml(doc: str) -> None:
    commands = commands_in(doc)
    ray = [c for c in commands if c[0] == "ray" and c[1] in ("up", "dashboard", "exec", "down", "attach")]
    assert {c[1] for c in ray} >= {"up", "dashboard", "exec", "down"}  # launch, tunnel, inspect, tear down
    assert all(c[2] == "cluster.yaml" for c in ray), ray
    jobs = [c[3:] for c in commands if c[:3] == ["python", "-m", "raytrain_app.jobs"]]
    assert {c[0] for c in jobs} >= {"submit", "logs", "stop"}  # submit, follow, stop
    assert ["logs", "--follow", "demo-gpu"] in jobs and ["stop", "demo-gpu"] in jobs
    # After `--`: a training command, or with --sweep a sweep's; each parses as its module parses it.
    sweeps = [parse_sweep_config(c[c.index("--") + 1:]) for c in jobs if c[0] == "submit" and "--sweep" in c]
    submits = [c[c.index("--") + 1:] for c in jobs if c[0] == "submit" and "--sweep" not in c]
    configs = [parse_config(args)[0] for args in submits] + [cfg for _, cfg, _ in sweeps]
    assert any(cfg.run_name == "demo-gpu" and cfg.save_dir.startswith("s3://my-bucket/") and cfg.use_gpu
               for cfg in configs)
    if doc == "cloud.md":  # interrupted, then the same command again: it continues the run
        assert len(submits) == 2 and submits[0] == submits[1]


def test_the_clients_token_is_the_one_the_nodes_get() -> None:
    commands = commands_in("cloud.md")
    [make_token] = [c for c in commands if c[:2] == ["mkdir", "-p"]]
    local_folder = make_token[2]
    assert CLUSTER["file_mounts"][REMOTE_TOKEN_FOLDER] == local_folder
    exports = {k: v for c in commands if c[0] == "export" for k, _, v in (w.partition("=") for w in c[1:])}
    assert exports["RAY_AUTH_TOKEN_PATH"] == f"{local_folder}/auth_token"
    assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8265"
    assert "> ~/.ray/raytrain_cluster/auth_token" in DOCS["cloud.md"].read_text()
    # The nodes: the mounted folder holds the file their Ray processes read.
    node_env = " ".join(CLUSTER["docker"]["run_options"])
    assert f"RAY_AUTH_TOKEN_PATH={REMOTE_TOKEN_FOLDER}/auth_token" in node_env and "RAY_AUTH_MODE=token" in node_env



def test_the_image_built_and_pushed_is_the_one_every_node_and_pod_runs() -> None:
    for doc in DOCS:
        for command in commands_in(doc):
            if command[:2] == ["docker", "build"]:
                assert (REPO_ROOT / after(command, "-f")) == REPO_ROOT / "jobs" / "Dockerfile" and command[-1] == "."
                assert after(command, "-t") == CLUSTER["docker"]["image"]
            if command[:2] == ["docker", "push"]:
                assert command[2] == CLUSTER["docker"]["image"]
    assert rayjob_images() == {CLUSTER["docker"]["image"]}
    [create] = [c for c in commands_in("cloud.md") if c[:3] == ["aws", "ecr", "create-repository"]]
    repository = after(create, "--repository-name")
    assert CLUSTER["docker"]["image"].split("/", 1)[1].split(":")[0] == repository
    [login] = [c for c in commands_in("cloud.md") if c[:2] == ["docker", "login"]]
    assert CLUSTER["docker"]["image"].startswith(login[-1] + "/")


def test_the_iam_roles_made_are_the_profiles_the_nodes_get() -> None:
    commands = commands_in("cloud.md")
    roles = {after(c, "--role-name"): after(c, "--policy-document") for c in commands
             if c[:3] == ["aws", "iam", "put-role-policy"]}
    profiles = {after(c, "--instance-profile-name") for c in commands if c[:3] == ["aws", "iam",
                                                                                   "create-instance-profile"]}
    types = CLUSTER["available_node_types"]
    assert profiles == set(roles) == {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()}
    for role, document in roles.items():
        assert (REPO_ROOT / document.removeprefix("file://")).is_file(), document
        assert document == f"file://jobs/aws/{role.removeprefix('raytrain-')}-policy.json"
    for command in commands:
        if command[:2] == ["aws", "iam"] and "--assume-role-policy-document" in command:
            assert after(command, "--assume-role-policy-document") == "file://jobs/aws/ec2-trust-policy.json"


def test_the_machine_image_pinned_is_the_one_cluster_yaml_names() -> None:
    [get] = [c for c in commands_in("cloud.md") if c[:3] == ["aws", "ssm", "get-parameter"]]
    images = {t["node_config"]["ImageId"] for t in CLUSTER["available_node_types"].values()}
    assert images == {"resolve:ssm:" + after(get, "--name")}
    assert after(get, "--region") == CLUSTER["provider"]["region"]


def test_the_placeholders_are_replaced_in_every_file_that_holds_them() -> None:
    [sed] = [c for c in commands_in("cloud.md") if c[0] == "sed"]
    covered = {Path(p).resolve() for pattern in sed[3:] for p in glob.glob(str(REPO_ROOT / pattern))}
    assert sed[2] == "s/123456789012/123456789012/g; s/my-bucket/my-bucket/g"  # $ACCOUNT, $BUCKET put in
    holders = set()
    for path in [REPO_ROOT / "cluster.yaml", *REPO_ROOT.joinpath("jobs").rglob("*")]:
        if path.is_file() and re.search(r"123456789012|my-bucket", path.read_text()):
            holders.add(path.resolve())
    assert holders and holders <= covered, sorted(map(str, holders - covered))


def test_every_kuberay_step_names_the_rayjob_as_it_is() -> None:
    name = RAYJOB["metadata"]["name"]
    for doc in DOCS:
        commands = [c for c in commands_in(doc) if c[0] == "kubectl"]
        assert ["kubectl", "apply", "-f", "jobs/rayjob.yaml"] in commands  # launch
        assert ["kubectl", "logs", "-f", f"job/{name}"] in commands  # follow (the submitter Job)
        assert ["kubectl", "delete", "rayjob", name] in commands  # tear down
        for command in commands:
            for word in command:
                if word.startswith(("job/", "svc/")):
                    # KubeRay names a RayJob's cluster <name>-raycluster-<random>: its head Service is found by
                    # the cluster name the RayJob's status gives (a $(...) in the command)
                    assert word in (f"job/{name}", "svc/{subst}-head-svc"), word
            if command[1:3] == ["get", "rayjob"]:
                assert command[3] == name
                if "jsonpath='{.status.rayClusterName}'" in " ".join(command) or "-o" in command:
                    assert after(command, "-o").startswith("jsonpath={.status.")
    cloud = commands_in("cloud.md")
    assert any(c[:3] == ["ray", "job", "stop"] for c in cloud)  # stop, gracefully
    [helm] = [c for c in cloud if c[:2] == ["helm", "install"]]
    header = RAYJOB_TEXT.split("apiVersion:")[0]
    assert f"KubeRay operator >= {after(helm, '--version')}" in " ".join(header.split())

