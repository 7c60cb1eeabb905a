"""Issue 12, desk: the chart's generated desk token must not change on every render.

The chart renders no token at all: without desk.tokensSecret its pre-install/pre-upgrade hook
Job (`synpref secrets ensure`) creates the desk's token Secret once and never replaces it. So
a render against a cluster that holds the Secret (the real helm with `--dry-run=server`, against
a minimal Kubernetes API on loopback) is byte for byte the render without one, and two renders
without a cluster (what GitOps tools do) are too. The token the hook makes must pass the desk's
own token rule, or the default desk would refuse to start.
"""

from __future__ import annotations

import base64
import subprocess
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from synpref.services.desk.tokens import parse_tokens, token_problem
from synpref.shared.k8s_secrets import new_value, parse_wanted
from testing.json_api import JsonHandler

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "synpref"
RELEASE, NAMESPACE = "rel", "ml"
SECRET = f"{RELEASE}-synpref-desk-tokens"
KEPT = "admin:kept-Zq7rT0kP3mW9xV2bN5cJ8dF1gH4sL6a"


@pytest.fixture(scope="module")
def helm() -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "helm" / "build.sh")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"tools/helm/build.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return str(ROOT / ".cache" / "bin" / "helm")


class KubeApi(JsonHandler):
    """Just enough of the API server for helm's discovery and release lookup; it holds the desk's Secret."""

    secrets: ClassVar[dict[str, dict[str, str]]] = {SECRET: {"tokens": base64.b64encode(KEPT.encode()).decode()}}

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        secrets_path = f"/api/v1/namespaces/{NAMESPACE}/secrets"
        if path == "/version":
            self.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        elif path == "/api":
            self.reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif path == "/api/v1":
            secrets = {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret"}
            resources = [{**secrets, "verbs": ["get", "list"]}]
            self.reply(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
        elif path == secrets_path:
            self.reply(200, {"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": []})
        elif path.startswith(secrets_path + "/") and path.rsplit("/", 1)[1] in self.secrets:
            name = path.rsplit("/", 1)[1]
            meta = {"name": name, "namespace": NAMESPACE}
            self.reply(200, {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": self.secrets[name]})
        else:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "reason": "NotFound", "code": 404})


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "u", "user": {"token": "unused"}}],
        "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "u", "namespace": NAMESPACE}}],
        "current-context": "loopback",
    }
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump(config))
    yield path
    server.shutdown()
    thread.join(timeout=10)


def render(helm: str, *args: str) -> str:
    proc = subprocess.run(
        [
            helm,
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "-f",
            str(CHART / "ci" / "base-values.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def desk_specs(rendered: str) -> list[str]:
    """The `--secret NAME:KEY:FORMAT` arguments of the secrets hook Job that name the desk's Secret."""
    for doc in yaml.safe_load_all(rendered):
        assert not (doc and doc.get("kind") == "Secret"), f"the chart rendered Secret {doc['metadata']['name']}"
        if doc and doc.get("kind") == "Job" and doc["metadata"]["name"] == f"{RELEASE}-synpref-secrets":
            command = doc["spec"]["template"]["spec"]["containers"][0]["command"]
            return [arg for arg in command if arg.startswith(f"{SECRET}:")]
    return []


def test_a_render_with_the_secret_in_the_cluster_equals_one_without(helm: str, kubeconfig: Path) -> None:
    with_cluster = [render(helm, "--dry-run=server", "--kubeconfig", str(kubeconfig)) for _ in range(2)]
    without = [render(helm) for _ in range(2)]
    assert with_cluster[0] == with_cluster[1] == without[0] == without[1]
    assert desk_specs(without[0]) == [f"{SECRET}:tokens:desk"]


def test_the_token_the_hook_makes_passes_the_desk_rule(helm: str) -> None:
    (spec,) = desk_specs(render(helm))
    wanted = parse_wanted(spec)
    for _ in range(50):
        token = parse_tokens(new_value(wanted.format))["admin"]
        assert token_problem(token) is None


def test_a_named_secret_renders_no_token_at_all(helm: str) -> None:
    assert desk_specs(render(helm, "--set", "desk.tokensSecret=my-desk-tokens")) == []
