"""charts/synpref with the real helm binary (tools/helm/build.sh builds it from the Go module proxy).

Covers: `helm lint --strict`; rendering with default values and every example values file;
every rendered object validated against the Kubernetes schemas of each supported version
(kubernetes-validate); hardening, resources and probes on every container; the RBAC the
controller gets; values.schema.json rejecting bad values; the config the chart writes
loading into the real Settings model; and the training Job of the CronJob being the very
Job `synpref train submit` builds (training/k8s_job.py) for the same values.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from synpref.shared.cli import COMMANDS
from synpref.shared.config import load_settings
from synpref.shared.health_cli import parse_args as parse_health_args
from synpref.shared.k8s_secrets import parse_args as parse_secrets_args
from synpref.training.k8s_job import TrainingJobSpec, build_rendezvous_service, build_training_job, to_manifest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# The judges and sources every install must give (the chart refuses to render without them).
BASE_VALUES = CHART / "ci" / "base-values.yaml"
# The chart's kubeVersion is >=1.30; these are the versions it is validated against.
KUBE_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
RELEASE, NAMESPACE = "rel", "ml"
STAGES = ["annotator", "gold-scorer", "filter", "writer"]
POD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob", "Pod"}


@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "helm" / "build.sh")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"tools/helm/build.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return str(ROOT / ".cache" / "bin" / "helm")


def run_helm(helm: str, *args: str, chart: Path = CHART, base: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` of `chart` with BASE_VALUES first (unless not `base`), then `args`."""
    first = ["-f", str(BASE_VALUES)] if base else []
    return subprocess.run(
        [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *first, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# name -> helm arguments; every example file, the defaults, and a few shapes worth checking.
CASES: dict[str, list[str]] = {
    "default": [],
    **{f"example:{p.stem}": ["-f", str(p)] for p in EXAMPLES},
    # The controller needs the PVC (its state, the judges' examples): without one it is refused.
    "no-persistence": ["--set", "persistence.enabled=false,controller.enabled=false"],
    # An integer cpu request too: quantities must come out as the same strings both ways.
    "multi-node": ["--set", "training.nodes=3,training.gpusPerNode=4,training.resources.requests.cpu=6"],
    "minimal": ["--set", "scorer.enabled=false,desk.enabled=false,controller.enabled=false"],
    "no-network-policy": ["--set", "networkPolicy.enabled=false"],
    "dev-judges": ["--set", "devJudges.enabled=true"],
    # The user brings every token Secret: no hook Job, no generated anything.
    "named-secrets": [
        "--set",
        "desk.tokensSecret=my-desk,scorer.admin.tokenSecret=my-admin,grpcAuth.tokenSecret=my-grpc",
    ],
}
SECRETS_HOOK = f"{RELEASE}-synpref-secrets"


@pytest.fixture(scope="session")
def renders(helm: str) -> dict[str, list[dict[str, Any]]]:
    return {name: render(helm, *args) for name, args in CASES.items()}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, name)
    return doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return dict(doc["spec"])
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def ensured(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(name, key, format) of each Secret the secrets hook Job creates if missing; empty without the Job."""
    jobs = find(docs, "Job", SECRETS_HOOK)
    if not jobs:
        return set()
    command = pod_spec(jobs[0])["containers"][0]["command"]
    # The rendered command line, read by the command's own parser.
    assert command[:2] == ["synpref", "secrets"] and COMMANDS["secrets"][0] == "synpref.shared.k8s_secrets"
    args = parse_secrets_args(command[2:])
    assert (args.action, args.namespace) == ("ensure", NAMESPACE)
    return {astuple(wanted) for wanted in args.secrets}


def test_example_files_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"cpu-dev", "gpu-cluster", "external-kafka-sasl"}


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.stem if p else "default")
def test_helm_lint_strict_is_clean(helm: str, values: Path | None) -> None:
    # Without the base values the templates fail early and lint would pass on what it never rendered.
    args = ["-f", str(BASE_VALUES), *(["-f", str(values)] if values else [])]
    proc = subprocess.run([helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
    assert "Fail:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_default_render_has_every_component(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["default"]
    fullname = f"{RELEASE}-synpref"
    for component in [*STAGES, "scorer"]:
        name = f"{fullname}-{component}"
        one(docs, "Deployment", name)
        one(docs, "Service", name)
        one(docs, "PodDisruptionBudget", name)
        # The writer is one pod per dataset version (its manifest has one author), replaced by Recreate.
        assert bool(find(docs, "HorizontalPodAutoscaler", name)) == (component != "writer")
    writer = one(docs, "Deployment", f"{fullname}-writer")
    assert writer["spec"]["replicas"] == 1 and writer["spec"]["strategy"] == {"type": "Recreate"}
    for component in ("desk", "controller"):
        one(docs, "Deployment", f"{fullname}-{component}")
    # The desk refuses to start without tokens: with no Secret named, the hook Job makes one.
    assert (f"{fullname}-desk-tokens", "tokens", "desk") in ensured(docs)
    desk_env = {e["name"]: e for e in pod_spec(one(docs, "Deployment", f"{fullname}-desk"))["containers"][0]["env"]}
    assert desk_env["SYNPREF_DESK__TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{fullname}-desk-tokens",
        "key": "tokens",
    }
    one(docs, "ConfigMap", f"{fullname}-config")
    one(docs, "PersistentVolumeClaim", f"{fullname}-data")
    assert one(docs, "CronJob", f"{fullname}-train")["spec"]["suspend"] is True
    hook = one(docs, "Job", f"{fullname}-topics")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert pod_spec(hook)["containers"][0]["command"] == ["synpref", "topics"]
    # internal, metrics, scorer-internal, scorer-admin, scorer (RL clients), desk
    assert len(find(docs, "NetworkPolicy")) == 8  # default-deny, stages-grpc, metrics, training, 3 scorer, desk


@functools.cache
def _schema(filename: str, version: str) -> Any:
    return _uncached_schema(filename, version)


_uncached_schema = kubernetes_validate.utils.schema_contents


@pytest.fixture()
def cached_schemas(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # kubernetes-validate re-reads the (large) definitions file on every call; this run
    # validates a few hundred objects, so read each file once.
    monkeypatch.setattr(kubernetes_validate.utils, "schema_contents", _schema)
    yield


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_object_validates(
    helm: str, renders: dict[str, list[dict[str, Any]]], version: str, cached_schemas: None
) -> None:
    # The chart's kubeVersion constraint accepts this version...
    proc = run_helm(helm, "--kube-version", f"{version}.0")
    assert proc.returncode == 0, proc.stderr
    # ...and each object of each render is valid for it (strict: no unknown fields).
    checked = 0
    for case, docs in renders.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{case}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {exc.message}")
            checked += 1
    assert checked > 100


def test_schema_validation_would_catch_a_bad_object(cached_schemas: None) -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


def test_older_clusters_are_refused(helm: str) -> None:
    proc = run_helm(helm, "--kube-version", "1.29.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_every_container_is_hardened_and_sized(renders: dict[str, list[dict[str, Any]]], case: str) -> None:
    pods = [d for d in renders[case] if d["kind"] in POD_KINDS]
    assert pods
    for doc in pods:
        where = f"{case}: {doc['kind']}/{doc['metadata']['name']}"
        pod = pod_spec(doc)
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] >= 1, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        calls_the_api = doc["metadata"]["name"] in (f"{RELEASE}-synpref-controller", SECRETS_HOOK)
        # Only the controller and the secrets hook call the Kubernetes API.
        assert pod["automountServiceAccountToken"] is calls_the_api, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            csc = container["securityContext"]
            assert csc["runAsNonRoot"] is True, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            res = container["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), where
            assert "memory" in res["limits"], where
            # A read-only root needs a writable /tmp.
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, where


@pytest.mark.parametrize("case", list(CASES))
def test_long_running_containers_have_probes_on_their_ports(
    renders: dict[str, list[dict[str, Any]]], case: str
) -> None:
    # The path is each container's own (the desk: /healthz live, /readyz ready: test_desk_health.py).
    expected = {"scorer": {"grpc": {"port": 50060}}, "desk": {"httpGet": {"port": "http"}}}
    expected |= {stage: {"grpc": {"port": 50051}} for stage in [*STAGES, "controller"]}
    expected["kafka"] = {"tcpSocket": {"port": "kafka"}}
    expected["judges"] = {"httpGet": {"path": "/health", "port": "http"}}
    deployments = find(renders[case], "Deployment") + find(renders[case], "StatefulSet")
    assert deployments
    for doc in deployments:
        (container,) = pod_spec(doc)["containers"]
        check = expected[container["name"]]
        for probe in ("livenessProbe", "readinessProbe"):
            for handler, spec in check.items():  # the probe may name more (the scorer's gRPC health service)
                assert spec.items() <= container[probe][handler].items(), f"{case}: {container['name']} {probe}"
        ports = {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"]}
        for spec in check.values():
            assert spec["port"] in ports


@pytest.mark.parametrize("case", [case for case in CASES if case != "minimal"])
def test_the_scorer_is_live_once_it_listens_and_ready_once_its_start_up_models_loaded(
    renders: dict[str, list[dict[str, Any]]], case: str
) -> None:
    """Startup and liveness ask the scorer's "liveness" health service (SERVING once it listens: a model that
    loads for minutes must not get the pod killed); readiness asks "" (SERVING once the models it starts with
    are loaded: no traffic to a pod still loading). Before, all three asked "", SERVING once it listened."""
    from synpref.services.scorer.server import LIVENESS, OVERALL

    (container,) = pod_spec(one(renders[case], "Deployment", f"{RELEASE}-synpref-scorer"))["containers"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50060, "service": LIVENESS}, f"{case}: {probe}"
    # No service named is the overall service "" (Kubernetes sends the empty name).
    assert container["readinessProbe"]["grpc"].get("service", "") == OVERALL, case
    # Readiness now waits for the load, so a rollout's progress deadline must outlast it (600 s by default).
    assert one(renders[case], "Deployment", f"{RELEASE}-synpref-scorer")["spec"]["progressDeadlineSeconds"] >= 1800


def test_gpu_requests_node_selectors_and_tolerations_come_from_values(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["example:gpu-cluster"]
    scorer = pod_spec(one(docs, "Deployment", f"{RELEASE}-synpref-scorer"))
    assert scorer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert scorer["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert scorer["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    train = pod_spec(one(docs, "CronJob", f"{RELEASE}-synpref-train"))
    assert train["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    cpu_scorer = pod_spec(one(renders["example:cpu-dev"], "Deployment", f"{RELEASE}-synpref-scorer"))
    assert "nvidia.com/gpu" not in cpu_scorer["containers"][0]["resources"]["limits"]


def test_rbac_grants_the_controller_only_what_it_uses(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["default"]
    role = one(docs, "Role", f"{RELEASE}-synpref-controller")
    granted = {
        (g, r): sorted(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted == {
        # What the code calls (training/k8s_job.py): no watch, no delete, no pod logs.
        ("batch", "jobs"): sorted(["create", "get", "list"]),
        ("", "configmaps"): ["create", "update"],
        # services/controller/job_pods.py: why a waiting Job's pod does not run.
        ("", "pods"): ["list"],
    }
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    binding = one(docs, "RoleBinding", f"{RELEASE}-synpref-controller")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-synpref-controller", "namespace": NAMESPACE}
    ]
    users = [d["metadata"]["name"] for d in docs if d["kind"] in POD_KINDS
             and pod_spec(d)["serviceAccountName"] == f"{RELEASE}-synpref-controller"]  # fmt: skip
    assert users == [f"{RELEASE}-synpref-controller"]
    for sa in find(docs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    # Multi-node training: submit may create the headless Service, and nothing more.
    multi = one(renders["multi-node"], "Role", f"{RELEASE}-synpref-controller")
    extra = [r for r in multi["rules"] if r not in role["rules"]]
    assert extra == [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]}]


# --- token Secrets: made once by a hook Job, never rendered -------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_rendering_is_deterministic_and_renders_no_secret(helm: str, case: str) -> None:
    # A value generated at render time would differ between these two renders, and a GitOps
    # tool (which renders with `helm template`) would apply a new token on every sync.
    first, second = run_helm(helm, *CASES[case]), run_helm(helm, *CASES[case])
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    docs = [d for d in yaml.safe_load_all(first.stdout) if d]
    assert not find(docs, "Secret")


def secret_refs(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(Secret, key) of every single-key reference a pod of the release makes (env and volume items)."""
    refs = set()
    for doc in (d for d in docs if d["kind"] in POD_KINDS):
        pod = pod_spec(doc)
        for container in pod["containers"]:
            for env in container.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    refs.add((ref["name"], ref["key"]))
        for volume in pod.get("volumes", []):
            for item in volume.get("secret", {}).get("items", []):
                refs.add((volume["secret"]["secretName"], item["key"]))
    return refs


def test_the_hook_ensures_exactly_the_token_secrets_nobody_named(renders: dict[str, list[dict[str, Any]]]) -> None:
    full = f"{RELEASE}-synpref"
    every = {(f"{full}-desk-tokens", "tokens", "desk"), (f"{full}-scorer-admin", "token", "token"),
             (f"{full}-grpc-token", "token", "token")}  # fmt: skip
    assert ensured(renders["default"]) == every
    # Scorer, desk and controller off: only the stages' token is needed.
    assert ensured(renders["minimal"]) == {(f"{full}-grpc-token", "token", "token")}
    for case, docs in renders.items():
        made = {(name, key) for name, key, _ in ensured(docs)}
        # Each Secret the hook makes is one a pod reads, under the key the pod reads...
        generated = {(name, key) for name, key in secret_refs(docs) if name.startswith(f"{full}-")}
        assert made == generated, case
    # ...and with every Secret named by the user, nothing is made and the pods read the user's.
    named = renders["named-secrets"]
    assert not [d for d in named if d["metadata"]["name"] == SECRETS_HOOK]
    assert {("my-desk", "tokens"), ("my-admin", "token"), ("my-grpc", "token")} <= secret_refs(named)


def test_a_partly_named_set_makes_only_the_rest(helm: str) -> None:
    docs = render(helm, "--set", "desk.tokensSecret=my-desk,desk.tokensKey=list")
    assert {name for name, _, _ in ensured(docs)} == {
        f"{RELEASE}-synpref-scorer-admin",
        f"{RELEASE}-synpref-grpc-token",
    }
    assert ("my-desk", "list") in secret_refs(docs)


def test_the_secrets_hook_runs_first_with_only_get_and_create(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["default"]
    hook_objects = [d for d in docs if d["metadata"]["name"] == SECRETS_HOOK]
    assert sorted(d["kind"] for d in hook_objects) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    weights: dict[str, int] = {}
    for doc in hook_objects:
        notes = doc["metadata"]["annotations"]
        # Helm runs these before the release's objects; Argo CD maps them to PreSync hooks.
        assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        weights[doc["kind"]] = int(notes["helm.sh/hook-weight"])
    assert max(weights[k] for k in ("ServiceAccount", "Role", "RoleBinding")) < weights["Job"] < 0
    # The topics hook runs after install; nothing else may run before the Secrets exist.
    other_pre_hooks = [d for d in docs if "pre-install" in d["metadata"].get("annotations", {}).get("helm.sh/hook", "")
                       and d["metadata"]["name"] != SECRETS_HOOK]  # fmt: skip
    assert other_pre_hooks == []
    role = one(docs, "Role", SECRETS_HOOK)
    names = sorted(name for name, _, _ in ensured(docs))
    get_rule, create_rule = role["rules"]
    assert sorted(get_rule["resourceNames"]) == names
    assert {k: v for k, v in get_rule.items() if k != "resourceNames"} == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
    }
    # `create` cannot be limited by name (Kubernetes RBAC); nothing may update, patch or delete.
    assert create_rule == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
    binding = one(docs, "RoleBinding", SECRETS_HOOK)
    assert binding["roleRef"]["name"] == SECRETS_HOOK
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SECRETS_HOOK, "namespace": NAMESPACE}]
    pod = pod_spec(one(docs, "Job", SECRETS_HOOK))
    assert pod["serviceAccountName"] == SECRETS_HOOK and pod["restartPolicy"] == "Never"
    # It runs before the release's ConfigMap and PVC exist: it must not mount them.
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_hpas_target_their_deployments_which_then_leave_replicas_to_them(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    for case in ("default", "example:gpu-cluster"):
        docs = renders[case]
        hpas = find(docs, "HorizontalPodAutoscaler")
        autoscaled = [c for c in [*STAGES, "scorer"] if c != "writer"]
        assert {h["metadata"]["name"] for h in hpas} == {f"{RELEASE}-synpref-{c}" for c in autoscaled}
        for hpa in hpas:
            deploy = one(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
            assert "replicas" not in deploy["spec"]
            assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    docs = renders["example:cpu-dev"]
    assert not find(docs, "HorizontalPodAutoscaler")
    assert all(d["spec"]["replicas"] == 1 for d in find(docs, "Deployment"))


def test_pdbs_and_services_select_their_pods(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["default"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in find(docs, "Deployment")}
    for kind, key in (("PodDisruptionBudget", "matchLabels"), ("Service", None)):
        for obj in find(docs, kind):
            name = obj["metadata"]["name"]
            if name.endswith(("-train", "-headless")):
                continue
            selector = obj["spec"]["selector"][key] if key else obj["spec"]["selector"]
            matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
            assert matched == [name], f"{kind}/{name} selects {matched}"


def test_network_policies_admit_the_release_and_the_configured_peers(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["example:gpu-cluster"]
    deny = one(docs, "NetworkPolicy", f"{RELEASE}-synpref-default-deny")
    release = {"app.kubernetes.io/name": "synpref", "app.kubernetes.io/instance": RELEASE}
    assert deny["spec"]["podSelector"]["matchLabels"] == release
    assert deny["spec"]["ingress"] == []  # ports open one by one (tests/security/test_pipeline_grpc_chart.py)
    scorer = one(docs, "NetworkPolicy", f"{RELEASE}-synpref-scorer")
    (rule,) = scorer["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {50060, 8080}
    assert {"podSelector": {}} in rule["from"]
    assert not find(renders["no-network-policy"], "NetworkPolicy")


def test_pipeline_config_loads_into_the_settings_model(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CASES:
        monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
        cm = one(renders[name], "ConfigMap", f"{RELEASE}-synpref-config")
        path = tmp_path / f"{name.replace(':', '_')}.yaml"
        path.write_text(cm["data"]["config.yaml"])
        settings = load_settings(path)
        assert settings.service.grpc_port == 50051 and settings.service.metrics_port == 9100
        assert settings.scorer.host == "0.0.0.0" and settings.scorer.port == 50060
        if name != "minimal":
            # The headless Service: the gold scorer's round_robin channel calls every scorer pod.
            assert settings.scoring.scorer_address == f"dns:///{RELEASE}-synpref-scorer-headless.{NAMESPACE}.svc:50060"


JUDGES_MISSING = "the controller and the annotator need LLM judges: set config.annotator.judges"
SOURCES_MISSING = "controller.enabled needs config.controller.sources"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], JUDGES_MISSING),
        (["--set", "controller.enabled=false"], JUDGES_MISSING),  # the annotator pods still need them
        (["--set-json", 'config.annotator.judges=[{"name":"j","base_url":"http://j/v1"}]'], SOURCES_MISSING),
        (["--set-json", 'config.controller.study={"judges":[{"name":"sim"}]}'], JUDGES_MISSING),
    ],
)
def test_bare_defaults_refuse_a_controller_without_judges_or_sources(helm: str, args: list[str], message: str) -> None:
    proc = run_helm(helm, *args, base=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_without_controller_and_annotator_nothing_needs_judges(helm: str) -> None:
    proc = run_helm(helm, "--set", "controller.enabled=false,stages.annotator.enabled=false", base=False)
    assert proc.returncode == 0, proc.stderr


def test_default_controller_is_production_with_the_desk_and_scores_through_the_scorer(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    for name in ("default", "example:gpu-cluster", "example:cpu-dev"):
        path = tmp_path / f"{name.replace(':', '_')}.yaml"
        path.write_text(one(renders[name], "ConfigMap", f"{RELEASE}-synpref-config")["data"]["config.yaml"])
        settings = load_settings(path)
        c = settings.controller
        assert c.study is None and c.human == "desk" and c.sources, name
        assert settings.annotator.judges, name
        assert c.executor == "kafka" and c.scorer_reload_url == f"http://{RELEASE}-synpref-scorer:8081", name
        assert settings.scoring.mode == "grpc"
        assert settings.scoring.scorer_address == f"dns:///{RELEASE}-synpref-scorer-headless.{NAMESPACE}.svc:50060"
        assert one(renders[name], "Deployment", f"{RELEASE}-synpref-controller")


def test_training_config_loads_into_reward_config(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    from synpref.training.reward_config import RewardConfig

    for name in CASES:
        path = tmp_path / f"{name.replace(':', '_')}.yaml"
        path.write_text(one(renders[name], "ConfigMap", f"{RELEASE}-synpref-config")["data"]["train.yaml"])
        config = RewardConfig.load(path)
        assert config.model_name_or_path.startswith("/data/") and config.output_dir.startswith("/data/checkpoints/")


def test_external_kafka_sasl_tls_wiring(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    docs = renders["example:external-kafka-sasl"]
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", f"{RELEASE}-synpref-config")["data"]["config.yaml"])
    kafka = load_settings(path).kafka
    assert kafka.security_protocol == "SASL_SSL" and kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.sasl_username == "synpref" and kafka.sasl_password is None  # never in the ConfigMap
    assert kafka.ssl_cafile == "/etc/synpref/kafka-tls/ca.crt"
    # Every pod but the secrets hook's (it talks to the Kubernetes API only) gets the Kafka credentials.
    for doc in [d for d in docs if d["kind"] in {"Deployment", "Job"} and d["metadata"]["name"] != SECRETS_HOOK]:
        pod = pod_spec(doc)
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["SYNPREF_KAFKA__SASL_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "kafka-credentials", "key": "password"}
        }
        assert {"name": "kafka-tls", "secret": {"secretName": "kafka-ca"}} in pod["volumes"]
    annotator = pod_spec(one(docs, "Deployment", f"{RELEASE}-synpref-annotator"))["containers"][0]
    assert annotator["envFrom"] == [{"secretRef": {"name": "synpref-api-keys"}}]


def test_the_controller_gets_the_api_keys_when_it_runs_the_attribute_labeller(helm: str) -> None:
    def controller(*args: str) -> dict[str, Any]:
        docs = render(helm, "--set", "secrets.apiKeys=llm-keys", *args)
        return pod_spec(one(docs, "Deployment", f"{RELEASE}-synpref-controller"))["containers"][0]

    labeller = [
        "--set",
        "config.annotator.attribute_model.name=m,config.annotator.attribute_model.base_url=http://x/v1",
    ]
    assert controller(*labeller)["envFrom"] == [{"secretRef": {"name": "llm-keys"}}]
    assert "envFrom" not in controller()  # no labeller: the keys stay with the annotator


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "kafka.securityProtocol=BOGUS"], "/kafka/securityProtocol"),
        (["--set", "kafka.bootstrapServers=no-port"], "/kafka/bootstrapServers"),
        (["--set", "training.nodes=0"], "/training/nodes"),
        (["--set", "scorer.gpus=-1"], "/scorer/gpus"),
        (["--set", "podSecurityContext.runAsUser=0"], "/podSecurityContext/runAsUser"),
        (["--set", "stages.filter.autoscaling.targetCPUUtilizationPercentage=150"], "targetCPUUtilizationPercentage"),
        (["--set", "stages.writer.resources=null"], "resources"),
        (["--set", "stages.writer.command=shell"], "/stages/writer/command"),
        (["--set", "persistence.size=lots"], "/persistence/size"),
        (["--set", "typoedKey=1"], "typoedKey"),
        (["--set", "config.kafka.bootstrap_servers=x:1"], "/config"),
    ],
)
def test_values_schema_rejects_bad_values(helm: str, args: list[str], message: str) -> None:
    proc = run_helm(helm, *args)
    assert proc.returncode != 0
    assert "don't meet the specifications of the schema" in proc.stderr and message in proc.stderr, proc.stderr
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0, lint.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "kafka.securityProtocol=SASL_SSL"], "kafka.sasl.mechanism is empty"),
        (["--set", "kafka.securityProtocol=SASL_SSL,kafka.sasl.mechanism=PLAIN"], "kafka.sasl.existingSecret"),
        (["--set", "kafka.sasl.mechanism=PLAIN,kafka.sasl.existingSecret=s"], "not SASL_PLAINTEXT or SASL_SSL"),
        (["--set", "training.nodes=2,training.gpusPerNode=0"], "training.gpusPerNode >= 1"),
        (["--set", "stages.writer.replicaCount=2"], "stages.writer runs one pod per dataset version"),
        (["--set", "stages.writer.autoscaling.enabled=true"], "stages.writer runs one pod per dataset version"),
    ],
)
def test_cross_field_checks_fail_rendering(helm: str, args: list[str], message: str) -> None:
    # Rules between fields live in the validateValues helper (helm lint reports `fail` as
    # INFO, so rendering is where they bite, as in `helm install`).
    proc = run_helm(helm, *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --- the training Job: chart template == training/k8s_job.py ------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_cronjob_job_equals_the_job_train_submit_builds(renders: dict[str, list[dict[str, Any]]], case: str) -> None:
    docs = renders[case]
    cron = one(docs, "CronJob", f"{RELEASE}-synpref-train")
    spec_file = one(docs, "ConfigMap", f"{RELEASE}-synpref-config")["data"]["train-job.yaml"]
    # What `synpref train submit run-1` reads in the controller pod...
    spec = TrainingJobSpec(**yaml.safe_load(spec_file), name="run-1")
    built = to_manifest(build_training_job(spec))
    # ...and what `kubectl create job --from=cronjob/...` copies: the jobTemplate's labels and spec.
    template = cron["spec"]["jobTemplate"]
    assert built["spec"] == template["spec"]
    assert built["metadata"]["labels"] == template["metadata"]["labels"]
    assert built["metadata"]["namespace"] == NAMESPACE
    services = find(docs, "Service", spec.rendezvous_service)
    if spec.nodes > 1:
        (service,) = services
        ours = to_manifest(build_rendezvous_service(spec))
        assert ours["spec"] == service["spec"] and ours["metadata"]["labels"] == service["metadata"]["labels"]
    else:
        assert services == []


def test_controller_trains_with_the_charts_job_shape(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """services/controller builds its training Jobs from config.controller.k8s_job: the same spec."""
    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    for case in ("default", "example:gpu-cluster", "multi-node"):
        data = one(renders[case], "ConfigMap", f"{RELEASE}-synpref-config")["data"]
        path = tmp_path / "config.yaml"
        path.write_text(data["config.yaml"])
        controller = load_settings(path).controller
        assert (controller.executor, controller.training) == ("kafka", "k8s")
        assert TrainingJobSpec(**controller.k8s_job) == TrainingJobSpec(**yaml.safe_load(data["train-job.yaml"]))
    config = yaml.safe_load(one(renders["minimal"], "ConfigMap", f"{RELEASE}-synpref-config")["data"]["config.yaml"])
    # The controller is off: the chart adds none of its cluster settings (the base values' sources stay).
    assert config["controller"] == {"sources": ["/data/input"]}


def test_job_comparison_sees_a_difference(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["default"]
    spec_file = one(docs, "ConfigMap", f"{RELEASE}-synpref-config")["data"]["train-job.yaml"]
    spec = TrainingJobSpec(**{**yaml.safe_load(spec_file), "shm_size": "9Gi"}, name="run-1")
    template = one(docs, "CronJob", f"{RELEASE}-synpref-train")["spec"]["jobTemplate"]
    assert to_manifest(build_training_job(spec))["spec"] != template["spec"]


def test_notes_say_what_was_installed_and_how_to_reach_it(helm: str, tmp_path: Path) -> None:
    # `helm template` never renders NOTES.txt (install does, with a cluster): render a copy
    # of the chart whose NOTES are wrapped in a ConfigMap.
    chart = tmp_path / "synpref"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "\n{{- end }}\n")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: |\n    {{- include "notes" . | nindent 4 }}\n'
    )
    proc = run_helm(helm, chart=chart)
    assert proc.returncode == 0, proc.stderr
    (cm,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["metadata"]["name"] == "notes"]
    text = cm["data"]["notes"]
    assert f"kubectl -n {NAMESPACE} create job --from=cronjob/{RELEASE}-synpref-train" in text
    assert f"port-forward svc/{RELEASE}-synpref-scorer 50060:50060 8080:8080" in text
    assert f"port-forward svc/{RELEASE}-synpref-desk 8000:8000" in text
    for stage in STAGES:
        assert f"{RELEASE}-synpref-{stage} (gRPC 50051, metrics 9100)" in text
    assert "secrets.apiKeys is empty" in text
    assert "gold scorer scores over gRPC" not in text
    # Without the scorer, a gold scorer over gRPC with no address waits for ever for the default one: say so.
    proc = run_helm(helm, "--set", "scorer.enabled=false", chart=chart)
    (cm,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["metadata"]["name"] == "notes"]
    assert "scorer.enabled is false and the gold scorer scores over gRPC" in cm["data"]["notes"]
    proc = run_helm(helm, "--set", "scorer.enabled=false,config.scoring.mode=in_process", chart=chart)
    (cm,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["metadata"]["name"] == "notes"]
    assert "gold scorer scores over gRPC" not in cm["data"]["notes"]


def test_dev_kafka_config_is_accepted_by_kafka(renders: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The dev broker's server.properties and cluster id, formatted by the real Kafka storage tool."""
    from testing.local_kafka import kafka_home

    docs = renders["example:cpu-dev"]
    name = f"{RELEASE}-synpref-kafka"
    config = one(docs, "ConfigMap", f"{RELEASE}-synpref-config")["data"]["config.yaml"]
    assert yaml.safe_load(config)["kafka"]["bootstrap_servers"] == f"{name}:9092"
    props = one(docs, "ConfigMap", name)["data"]["server.properties"]
    assert f"advertised.listeners=PLAINTEXT://{name}:9092" in props
    script = pod_spec(one(docs, "StatefulSet", name))["containers"][0]["command"][-1]
    cluster_id = script.split(" -t ")[1].split()[0]
    assert len(cluster_id) == 22
    # Same file, with the data folder moved somewhere writable here.
    local = tmp_path / "server.properties"
    local.write_text(props.replace("log.dirs=/var/lib/kafka/data", f"log.dirs={tmp_path / 'data'}"))
    classpath = ":".join(str(p) for p in sorted((kafka_home() / "libs").glob("*.jar")))
    cmd = ["java", "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone"]
    proc = subprocess.run(
        [*cmd, "--ignore-formatted", "-t", cluster_id, "-c", str(local)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "data" / "meta.properties").read_text().count(f"cluster.id={cluster_id}") == 1


def test_dev_judges_serve_models_from_the_data_volume_to_the_release(renders):
    docs = renders["dev-judges"]
    name = f"{RELEASE}-synpref-judges"
    spec = pod_spec(one(docs, "Deployment", name))
    (container,) = spec["containers"]
    assert container["command"][:2] == ["transformers", "serve"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-synpref-data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert one(docs, "Service", name)["spec"]["ports"][0]["port"] == 8000
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-synpref-dev-judges")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert not find(renders["default"], "Deployment", name)


def test_without_the_controller_the_filter_routes_decisions_to_the_writer(renders):
    # With the controller off nobody reads the decided topics; the filter must route by decision
    # (curated -> the writer, review, discarded), or a pipeline-only release writes nothing.
    def filter_command(case: str) -> list[str]:
        (container,) = pod_spec(one(renders[case], "Deployment", f"{RELEASE}-synpref-filter"))["containers"]
        return container["command"]

    assert filter_command("minimal") == ["synpref", "filter", "--by-decision"]
    assert filter_command("default") == ["synpref", "filter"]


@pytest.mark.parametrize("case", ["default", "dev-judges", "minimal"])
def test_helm_test_pod_checks_every_enabled_endpoint_through_its_service(
    renders: dict[str, list[dict[str, Any]]], case: str
) -> None:
    docs = renders[case]
    pod = one(docs, "Pod", f"{RELEASE}-synpref-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # helm uninstall leaves hook objects behind: a passed test Pod must delete itself.
    assert "hook-succeeded" in pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["synpref", "health"] and COMMANDS["health"][0] == "synpref.shared.health_cli"
    targets = parse_health_args(command[2:]).targets
    # The desk is asked whether it works (its Kafka operations do), not only whether it answers.
    desk = find(docs, "Deployment", f"{RELEASE}-synpref-desk")
    assert [t for t in targets if "-desk:" in t] == [f"http://{RELEASE}-synpref-desk:8000/readyz"] * len(desk)
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]} for d in find(docs, "Service")}
    for target in targets:
        host_port = target.split("://", 1)[-1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        assert int(port) in services.get(host, set()), f"{target}: no Service {host} with port {port}"
    # Every Deployment behind a Service is asked, on the port its probes use.
    probed = {t.split("://", 1)[-1].split(":", 1)[0] for t in targets}
    for deployment in find(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        assert name in probed or name not in services or name.endswith("-controller"), f"{name} is not checked"


def test_without_helm_test_no_test_pod(helm: str) -> None:
    assert not find(render(helm, "--set", "helmTest.enabled=false"), "Pod")
