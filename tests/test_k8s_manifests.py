"""k8s/ without a cluster: both overlays render with the real kustomize (kubectl's), every object and
every rendered Volcano job's pod template passes the Kubernetes schemas (strict: unknown fields are
errors), the servers' flags parse with ddm's own CLI parser, and the security and wiring rules hold."""

from __future__ import annotations

import re
import shlex

import pytest
from k8s_helpers import K8S, OVERLAYS, REPO, SCHEMA_VERSIONS, pod_of, render, validate

from ddm.coordinator.cli import build_parser
from ddm.coordinator.config import load_run_config
from ddm.coordinator.islands import load_islands
from ddm.coordinator.k8s_cmd import expert_files

CUSTOM_KINDS = {"Queue.scheduling.volcano.sh", "Job.batch.volcano.sh"}
K = {"local": 2, "production": 8}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(request.param)


def kind(obj: dict) -> str:
    return (
        obj["kind"]
        if "volcano" not in obj["apiVersion"]
        else f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}"
    )


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "Job") and "volcano" not in o["apiVersion"]]


def by(objs: list[dict], kind_: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind_ and o["metadata"]["name"] == name]
    assert found, f"no {kind_} {name}"
    return found[0]


def test_every_object_passes_the_schemas(overlay):
    name, objs = overlay
    kinds = {kind(o) for o in objs}
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "ConfigMap",
        "Job",
        "Queue.scheduling.volcano.sh",
    } <= kinds
    for obj in objs:
        if kind(obj) in CUSTOM_KINDS:
            continue  # no schema offline; the API server test installs their CRDs and applies them
        for version in SCHEMA_VERSIONS:
            validate(obj, version)


def test_schema_check_catches_a_typo():
    """The offline check is worth something: a misspelt field fails it, naming the field."""
    objs = render("local")
    dep = by(objs, "Deployment", "ddm-router")
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate(dep, SCHEMA_VERSIONS[0])


def test_pods_are_non_root_read_only_and_bounded(overlay):
    _, objs = overlay
    for w in workloads(objs):
        spec = w["spec"]["template"]["spec"]
        where = f"{w['kind']} {w['metadata']['name']}"
        assert (
            spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        ), where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
                c["resources"]["limits"]
            ), where
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{where}: needs a writable /tmp"
            if w["kind"] == "Deployment":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{where}: no {probe}"


def test_servers_args_parse_with_ddm_cli_and_mounts_exist(overlay):
    """Every container's args are a valid `ddm` command line; every file flag points into a mount."""
    _, objs = overlay
    parser = build_parser()
    for w in workloads(objs):
        spec = w["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = {e["name"] for e in c.get("env", [])}
        args = c["args"]
        for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
            assert ref in env, (
                f"{w['metadata']['name']}: $({ref}) is not a container env var (Kubernetes would leave it literal)"
            )
        parsed = parser.parse_args([re.sub(r"\$\((\w+)\)", "x", a) for a in args])
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for flag in (
            "token_file",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "expert_tls_ca",
            "expert_tls_cert",
            "expert_tls_key",
            "islands",
        ):
            path = getattr(parsed, flag, None)
            if path:
                assert any(path.startswith(m + "/") for m in mounts), (
                    f"{w['metadata']['name']}: --{flag} {path} is not in a mounted volume"
                )
        if parsed.command == "serve":
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert parsed.port == ports["grpc"] and parsed.metrics_port == ports["metrics"]
            probe = c["readinessProbe"]
            if "grpc" in probe:
                assert probe["grpc"]["port"] == parsed.port
            else:
                cmd = probe["exec"]["command"]
                assert cmd[:3] == ["python", "-m", "ddm.proto.probe"] and cmd[3] == f"127.0.0.1:{parsed.port}"


def test_router_dials_every_expert_headless_service_in_order(overlay):
    name, objs = overlay
    k = K[name]
    router = by(objs, "Deployment", "ddm-router")["spec"]["template"]["spec"]["containers"][0]
    experts = [a.split("=", 1)[1] for a in router["args"] if a.startswith("--expert=")]
    assert experts == [
        f"dns:///ddm-expert-{i}.$(POD_NAMESPACE).svc.$(CLUSTER_DOMAIN):50051" for i in range(k)
    ]
    for i in range(k):
        svc = by(objs, "Service", f"ddm-expert-{i}")
        dep = by(objs, "Deployment", f"ddm-expert-{i}")
        assert svc["spec"]["clusterIP"] == "None", (
            "round_robin needs a headless Service (one DNS record per replica)"
        )
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["ddm.dev/expert"] == f"expert-{i}"
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items()
        # the selector tells this expert's pods from the others'
        assert svc["spec"]["selector"]["ddm.dev/expert"] == f"expert-{i}"


def test_only_the_router_reaches_the_experts(overlay):
    _, objs = overlay
    policy = by(objs, "NetworkPolicy", "ddm-expert-ingress")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "expert"}
    grpc_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
    assert grpc_rules == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "router"}}}],
            "ports": [{"port": "grpc"}],
        }
    ]
    router_labels = by(objs, "Deployment", "ddm-router")["spec"]["template"]["metadata"]["labels"]
    assert router_labels["app.kubernetes.io/component"] == "router"
    for w in workloads(objs):
        if w["metadata"]["name"] != "ddm-router":
            assert w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") != "router"


def test_coordinator_role_is_namespaced_and_minimal(overlay):
    _, objs = overlay
    role = by(objs, "Role", "ddm-coordinator")
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    allowed = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert allowed[("batch.volcano.sh", "jobs")] == {"create", "get", "list", "watch", "delete"}
    assert allowed[("", "pods/log")] == {"get"}
    assert all("*" not in v for v in allowed.values()) and not any(
        r in ("secrets", "pods/exec") for _, r in allowed
    )
    binding = by(objs, "RoleBinding", "ddm-coordinator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ddm-coordinator", "namespace": "ddm"}]
    job = by(objs, "Job", "ddm-run")["spec"]["template"]["spec"]
    assert job["serviceAccountName"] == "ddm-coordinator"
    for w in workloads(objs):
        if w["metadata"]["name"] != "ddm-run":  # servers never talk to the API: no token mounted
            assert w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_s3_credentials_come_from_a_secret(overlay):
    _, objs = overlay
    for w in workloads(objs):
        c = w["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "ddm-s3"}} in c["envFrom"], w["metadata"]["name"]
        assert not [
            e for e in c.get("env", []) if re.search("SECRET|ACCESS_KEY|TOKEN", e["name"]) and "value" in e
        ]


def test_run_config_and_islands_in_the_configmap_load(overlay, tmp_path):
    name, objs = overlay
    cm = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("ddm-run")][0]
    for fname in ("run.toml", "islands.toml"):
        (tmp_path / fname).write_text(cm["data"][fname])
    cfg = load_run_config(str(tmp_path / "run.toml"), {"root": cm["data"]["root"]})
    assert cfg.partition.k == K[name]
    islands = load_islands(str(tmp_path / "islands.toml"))
    images = {c["image"] for w in workloads(objs) for c in w["spec"]["template"]["spec"]["containers"]}
    for isl in islands.island.values():
        assert isl.scheduler == "kubernetes" and isl.queue == "ddm" and isl.namespace == "ddm"
        assert isl.image in images, f"islands.toml image {isl.image} differs from the manifests' {images}"
        assert "ddm-s3" in isl.env_from_secrets and "ddm-env" in isl.env_from_configmaps
    names = {o["metadata"]["name"] for o in objs}
    assert "ddm-env" in names and (
        "ddm-s3" in names or name == "production"
    )  # referenced by job pods: no hash suffix


@pytest.mark.parametrize("name", OVERLAYS)
def test_committed_experts_component_is_what_the_generator_writes(name):
    out = f"k8s/overlays/{name}/experts"
    expected = expert_files(K[name], out, "k8s/expert")
    on_disk = {str(p.relative_to(REPO / out)): p.read_text() for p in (REPO / out).rglob("*.yaml")}
    assert on_disk == expected, (
        f"k8s/overlays/{name}/experts is stale: run `ddm k8s experts --k {K[name]} --out {out}`"
    )


def test_generator_cli_writes_a_renderable_component(tmp_path, capsys):
    import shutil
    import subprocess

    from k8s_helpers import kubectl

    from ddm.coordinator.cli import main

    shutil.copytree(K8S, tmp_path / "k8s")
    out = tmp_path / "k8s" / "overlays" / "local" / "experts"
    assert main(["k8s", "experts", "--k", "3", "--out", str(out)]) == 0
    text = subprocess.run(
        [kubectl(), "kustomize", str(out.parent)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert text.count("kind: Deployment") == 4 and "ddm-expert-2" in text
    assert main(["k8s", "experts", "--k", "0", "--out", str(out)]) == 2
    assert "at least one expert" in capsys.readouterr().err


# --- rendered jobs ------------------------------------------------------------------------------------
ISLANDS = """
default = "local"
[island.local]
scheduler = "local_cwd"
[island.east]
scheduler = "kubernetes"
experts = [1]
kubeconfig = "/nonexistent/kubeconfig"
kube_context = "east"
image = "registry.example.com/ddm:0.1.0"
namespace = "ddm"
queue = "ddm"
service_account = "ddm-workload"
env_from_secrets = ["ddm-s3"]
env_from_configmaps = ["ddm-env"]
j = "2x4"
gpu = 4
cpu = 16
memMB = 65536
[island.west]
scheduler = "kubernetes"
kubeconfig = "/nonexistent/other"
image = "registry.example.com/ddm:0.1.0"
namespace = "ddm-west"
queue = "gpu"
"""


def dry_run(tmp_path, capsys, monkeypatch, *extra, root: str = "s3://bucket/run"):
    """`ddm run tiny.toml --islands ... --dry-run` in this process (cwd: tmp_path): (exit code, out, err)."""
    from ddm.coordinator.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "islands.toml").write_text(ISLANDS)
    code = main(
        [
            "run",
            str(REPO / "configs/tiny.toml"),
            "--islands",
            str(tmp_path / "islands.toml"),
            "--root",
            root,
            "--dry-run",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_renders_every_job_without_a_cluster_or_writes(tmp_path, capsys, monkeypatch):
    import yaml

    code, stdout, stderr = dry_run(tmp_path, capsys, monkeypatch, "--set", 'router.island="west"')
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["islands.toml"], "--dry-run must write nothing"
    docs = [d for d in yaml.safe_load_all(stdout) if d]
    assert "# job expert-0 on island local (scheduler local_cwd)" in stdout
    local_cmds = [shlex.split(line[4:]) for line in stdout.splitlines() if line.startswith("# $ ")]
    assert local_cmds[0][-4:] == ["-m", "ddm.train", "--config", "s3://bucket/run/experts/expert-0/job.toml"]
    assert local_cmds[1][-4:] == ["-m", "ddm.train", "--config", "s3://bucket/run/distill/job.toml"]
    jobs = {
        d["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"][-1].split("/")[-2]: d
        for d in docs
    }
    assert set(jobs) == {"expert-1", "router"}
    expert = jobs["expert-1"]
    assert expert["kind"] == "Job" and expert["apiVersion"] == "batch.volcano.sh/v1alpha1"
    assert (
        expert["spec"]["queue"] == "ddm" and expert["spec"]["maxRetry"] == 0
    )  # retries are the coordinator's
    tasks = expert["spec"]["tasks"]
    assert len(tasks) == 2  # -j 2x4: two nodes
    for i, task in enumerate(tasks):
        spec = task["template"]["spec"]
        c = spec["containers"][0]
        assert spec["serviceAccountName"] == "ddm-workload"
        assert (
            c["resources"]["limits"]["nvidia.com/gpu"] == "4" and c["resources"]["limits"]["cpu"] == "16000m"
        )
        assert c["envFrom"] == [{"configMapRef": {"name": "ddm-env"}}, {"secretRef": {"name": "ddm-s3"}}]
        script = c["command"][-1]
        assert "--nnodes 2 --nproc-per-node 4" in script
        if i > 0:  # Volcano's variable for rank 0's host: dashes become underscores
            assert "${VC_TINY_EXPERT_1_0_HOSTS:=localhost}" in script
        for version in SCHEMA_VERSIONS:
            validate(pod_of(task["template"], task["name"]), version)
    assert jobs["router"]["spec"]["queue"] == "gpu"
    env = {
        e["name"]: e.get("value")
        for e in jobs["router"]["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TORCHX_JOB_ID"].startswith("kubernetes@west://")  # the handle names the island (its cluster)


def test_dry_run_names_what_is_wrong(tmp_path, capsys, monkeypatch):
    code, _, err = dry_run(tmp_path, capsys, monkeypatch, "--set", 'router.island="nowhere"')
    assert code == 2 and "router.island 'nowhere' is not defined" in err
    code, _, err = dry_run(tmp_path, capsys, monkeypatch, root=str(tmp_path / "local-root"))
    assert code == 2 and "cannot see the local run root" in err and "s3://" in err
    assert not (tmp_path / "local-root").exists()


def test_an_island_names_a_missing_kubeconfig_or_context(tmp_path):
    from ddm.coordinator.islands import Island
    from ddm.coordinator.kube import api_client

    base = {"scheduler": "kubernetes", "image": "i", "namespace": "ddm", "queue": "q"}
    with pytest.raises(
        ValueError, match="kubeconfig '/nonexistent/config' of a kubernetes island does not exist"
    ):
        api_client(Island(**base, kubeconfig="/nonexistent/config"))
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: a\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: a, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    assert api_client(Island(**base, kubeconfig=str(cfg))).configuration.host == "https://127.0.0.1:1"
    with pytest.raises(ValueError, match="context east"):
        api_client(Island(**base, kubeconfig=str(cfg), kube_context="east"))
