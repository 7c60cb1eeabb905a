"""Issue 12, desk: the chart's generated desk token must not change on every render.

The real helm renders the chart against a minimal Kubernetes API on loopback that holds the
desk's token Secret (`--dry-run=server`, so the template's `lookup` reaches it): the value is
kept, render after render. Without a cluster `lookup` finds nothing, so each render makes a
new token (docs/desk.md tells GitOps users to set desk.tokensSecret); every generated token
must pass the desk's own token rule, or the default desk would refuse to start.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from synpref.services.desk.tokens import parse_tokens, token_problem

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


class KubeApi(BaseHTTPRequestHandler):
    """Just enough of the API server for helm's discovery, release lookup and the chart's `lookup`."""

    secrets: ClassVar[dict[str, dict[str, str]]] = {SECRET: {"tokens": base64.b64encode(KEPT.encode()).decode()}}

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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


def desk_tokens(helm: str, *args: str) -> str | None:
    """The rendered desk token Secret's list, or None if the chart rendered no such Secret."""
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for doc in yaml.safe_load_all(proc.stdout):
        if doc and doc.get("kind") == "Secret" and doc["metadata"]["name"] == SECRET:
            return base64.b64decode(doc["data"]["tokens"]).decode()
    return None


def test_an_existing_token_secret_is_kept_on_every_render(helm: str, kubeconfig: Path) -> None:
    renders = [desk_tokens(helm, "--dry-run=server", "--kubeconfig", str(kubeconfig)) for _ in range(2)]
    assert renders == [KEPT, KEPT]


def test_without_a_cluster_each_render_makes_a_new_valid_token(helm: str) -> None:
    first, second = desk_tokens(helm), desk_tokens(helm)
    assert first is not None and second is not None and first != second
    for rendered in (first, second):
        token = parse_tokens(rendered)["admin"]
        assert token_problem(token) is None


def test_a_named_secret_renders_no_token_at_all(helm: str) -> None:
    assert desk_tokens(helm, "--set", "desk.tokensSecret=my-desk-tokens") is None
