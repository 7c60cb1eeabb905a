"""shared/k8s_secrets.py: `synpref secrets ensure`, which the chart's hook Job runs.

The decision tests replace only the CoreV1Api object (the module's one API boundary) with a
recorder that keeps Secrets in a dict and raises the client's own ApiException as the API
server would (404 for a missing Secret, 409 for a name taken). One test runs the whole command,
through the real kubernetes client and a kube config, against a loopback HTTP server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from synpref.services.desk.tokens import parse_tokens, token_problem
from synpref.shared import cli
from synpref.shared.k8s_secrets import (
    SecretError,
    WantedSecret,
    decide,
    ensure_secret,
    main,
    new_value,
    parse_args,
    parse_wanted,
)
from testing.json_api import JsonHandler, serving

NS = "ml"


class SecretsRecorder:
    """read/create of CoreV1Api over a dict name -> data; records every call."""

    def __init__(self, secrets: dict[str, dict[str, str]] | None = None, read_status: int = 0) -> None:
        self.secrets = dict(secrets or {})
        self.read_status = read_status
        self.race = False
        self.calls: list[tuple[str, str]] = []
        self.created: list[client.V1Secret] = []

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        self.calls.append(("read", name))
        assert namespace == NS
        if self.read_status:
            raise client.ApiException(status=self.read_status, reason="Forbidden")
        if name not in self.secrets:
            raise client.ApiException(status=404, reason="Not Found")
        return client.V1Secret(metadata=client.V1ObjectMeta(name=name), data=self.secrets[name])

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        self.calls.append(("create", body.metadata.name))
        assert namespace == NS
        if self.race or body.metadata.name in self.secrets:
            raise client.ApiException(status=409, reason="Conflict")
        self.created.append(body)
        self.secrets[body.metadata.name] = {
            k: base64.b64encode(v.encode()).decode() for k, v in body.string_data.items()
        }
        return body


# --- arguments ------------------------------------------------------------------------


def test_wanted_secrets_parse_with_token_as_the_default_format() -> None:
    assert parse_wanted("rel-synpref-grpc-token:token") == WantedSecret("rel-synpref-grpc-token", "token", "token")
    assert parse_wanted("rel-synpref-desk-tokens:tokens:desk") == WantedSecret(
        "rel-synpref-desk-tokens", "tokens", "desk"
    )


@pytest.mark.parametrize("spec", ["name", "name:", ":key", "a:b:desk:x", "a:b:", "a:b:bogus"])
def test_malformed_wanted_secrets_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_wanted(spec)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["ensure", "--namespace", NS, "--secret", spec])
    assert exit_.value.code == 2


def test_ensure_takes_repeated_secrets_and_needs_a_namespace() -> None:
    args = parse_args(["ensure", "--namespace", NS, "--secret", "a:token", "--secret", "b:tokens:desk"])
    assert (args.action, args.namespace) == ("ensure", NS)
    assert args.secrets == [WantedSecret("a", "token"), WantedSecret("b", "tokens", "desk")]
    with pytest.raises(SystemExit):
        parse_args(["ensure", "--secret", "a:token"])


def test_the_synpref_command_dispatches_secrets_to_this_module() -> None:
    assert cli.COMMANDS["secrets"][0] == "synpref.shared.k8s_secrets"
    assert "secrets" in cli.usage()


# --- values ---------------------------------------------------------------------------


def test_desk_values_are_a_token_list_the_desk_accepts() -> None:
    values = [new_value("desk") for _ in range(200)]
    tokens = [parse_tokens(v, "generated")["admin"] for v in values]
    assert all(v == f"admin:{t}" for v, t in zip(values, tokens, strict=True))
    assert all(token_problem(t) is None for t in tokens)
    assert len(set(tokens)) == len(tokens)


def test_bare_tokens_are_random_and_long() -> None:
    tokens = {new_value("token") for _ in range(200)}
    assert len(tokens) == 200
    # The stages' gRPC token file needs >= 16 characters; the desk rule is the strictest user.
    assert all(len(t) >= 40 and token_problem(t) is None and ":" not in t for t in tokens)


# --- the decision and the API calls ---------------------------------------------------


def test_decide_creates_missing_keeps_complete_and_refuses_keyless_secrets() -> None:
    assert decide(None, "token") == "create"
    assert decide({"token": "dG9rZW4="}, "token") == "keep"
    assert decide({}, "token") == "refuse"
    assert decide({"other": "eA=="}, "token") == "refuse"
    assert decide({"token": ""}, "token") == "refuse"


def test_a_missing_secret_is_created_once_with_a_fresh_value() -> None:
    api = SecretsRecorder()
    wanted = WantedSecret("rel-synpref-desk-tokens", "tokens", "desk")
    assert ensure_secret(api, NS, wanted) == "created"
    assert api.calls == [("read", wanted.name), ("create", wanted.name)]
    (secret,) = api.created
    assert (secret.metadata.name, secret.metadata.namespace, secret.type) == (wanted.name, NS, "Opaque")
    assert list(secret.string_data) == ["tokens"]
    assert token_problem(parse_tokens(secret.string_data["tokens"])["admin"]) is None
    # Argo CD tracks objects by app.kubernetes.io/instance: with it, a sync would prune this Secret.
    assert "app.kubernetes.io/instance" not in secret.metadata.labels
    # The next run (an upgrade, a sync) finds it and leaves it.
    stored = dict(api.secrets[wanted.name])
    assert ensure_secret(api, NS, wanted) == "kept"
    assert api.calls[2:] == [("read", wanted.name)]
    assert api.secrets[wanted.name] == stored


def test_an_existing_secret_is_never_written() -> None:
    api = SecretsRecorder({"rel-synpref-grpc-token": {"token": "dXNlcnM="}})
    assert ensure_secret(api, NS, WantedSecret("rel-synpref-grpc-token", "token")) == "kept"
    assert api.calls == [("read", "rel-synpref-grpc-token")]
    assert api.secrets == {"rel-synpref-grpc-token": {"token": "dXNlcnM="}}


def test_a_secret_without_the_key_is_reported_not_rewritten() -> None:
    api = SecretsRecorder({"rel-synpref-scorer-admin": {"password": "eA=="}})
    with pytest.raises(SecretError, match=r"Secret ml/rel-synpref-scorer-admin exists without key 'token'"):
        ensure_secret(api, NS, WantedSecret("rel-synpref-scorer-admin", "token"))
    assert api.calls == [("read", "rel-synpref-scorer-admin")]


def test_a_secret_created_meanwhile_by_someone_else_stands() -> None:
    api = SecretsRecorder()
    api.race = True
    assert ensure_secret(api, NS, WantedSecret("s", "token")) == "kept"
    assert api.calls == [("read", "s"), ("create", "s")] and api.created == []


def test_api_errors_name_the_secret_and_create_nothing() -> None:
    api = SecretsRecorder(read_status=403)
    with pytest.raises(SecretError, match=r"reading Secret ml/s failed: HTTP 403"):
        ensure_secret(api, NS, WantedSecret("s", "token"))
    assert api.calls == [("read", "s")]


def test_main_reports_each_secret_without_printing_a_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = SecretsRecorder({"kept": {"token": "dXNlcnM="}, "keyless": {"x": "eA=="}})
    monkeypatch.setattr("synpref.shared.k8s_secrets.connect", lambda kubeconfig, context: api)
    argv = ["ensure", "--namespace", NS, "--secret", "new:tokens:desk", "--secret", "kept:token"]
    assert main([*argv, "--secret", "keyless:token"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["created Secret ml/new (key tokens)", "kept Secret ml/kept (key token)"]
    assert "ml/keyless exists without key 'token'" in err
    made = base64.b64decode(api.secrets["new"]["tokens"]).decode()
    assert made.split(":", 1)[1] not in out + err
    assert main(argv) == 0


# --- the whole command through the real client -----------------------------------------


class LoopbackApi(JsonHandler):
    """GET and POST of core/v1 Secrets in one namespace, answered like the API server."""

    secrets: dict[str, dict[str, Any]]

    def do_GET(self) -> None:
        name = self.path.split("?")[0].rsplit("/", 1)[1]
        if self.path.startswith(f"/api/v1/namespaces/{NS}/secrets/") and name in self.secrets:
            self.reply(200, self.secrets[name])
        else:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "reason": "NotFound", "code": 404})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == f"/api/v1/namespaces/{NS}/secrets"
        # The API server folds stringData into data.
        data = {k: base64.b64encode(v.encode()).decode() for k, v in body.pop("stringData").items()}
        self.secrets[body["metadata"]["name"]] = {**body, "data": data}
        self.reply(201, self.secrets[body["metadata"]["name"]])


@pytest.fixture()
def kubeconfig(tmp_path: Path) -> Iterator[tuple[Path, type[LoopbackApi]]]:
    handler = type("Api", (LoopbackApi,), {"secrets": {}})
    with serving(handler) as url:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "unused"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        yield path, handler


def test_the_command_creates_then_keeps_through_the_kubernetes_client(
    kubeconfig: tuple[Path, type[LoopbackApi]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, handler = kubeconfig
    argv = ["secrets", "ensure", "--namespace", NS, "--kubeconfig", str(path), "--secret", "d:tokens:desk"]
    assert cli.main(argv) == 0
    first = handler.secrets["d"]["data"]["tokens"]
    assert parse_tokens(base64.b64decode(first).decode())["admin"]
    assert cli.main(argv) == 0
    assert handler.secrets["d"]["data"]["tokens"] == first
    assert capsys.readouterr().out.splitlines() == ["created Secret ml/d (key tokens)", "kept Secret ml/d (key tokens)"]


def test_without_credentials_the_command_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ensure", "--namespace", NS, "--kubeconfig", str(tmp_path / "none"), "--secret", "s:token"]) == 2
    assert "no Kubernetes credentials" in capsys.readouterr().err
