"""`synpref secrets ensure`: create the release's token Secrets once, never replace one.

The chart renders no generated secret value (a random value in a template changes on every
`helm template`, so GitOps tools would rotate the tokens on each sync). Instead, its
pre-install/pre-upgrade hook Job (charts/synpref/templates/secrets-hook.yaml) runs this
command for each token Secret the user did not name: a missing Secret is created with a
random token, an existing one is left as it is, so tokens survive installs, upgrades and
syncs. Deleting a Secret and upgrading again is how a token is rotated.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from kubernetes import client

from synpref.shared.kube import api_client

Format = Literal["token", "desk"]
FORMATS: tuple[Format, ...] = ("token", "desk")
"""token: the bare token. desk: the desk's `annotator:token` list holding one `admin` token."""
TOKEN_BYTES = 32
"""Random bytes per token: 43 URL-safe characters, which the desk's token rule accepts."""
LABELS = {"app.kubernetes.io/part-of": "synpref", "app.kubernetes.io/managed-by": "synpref-secrets"}
"""No app.kubernetes.io/instance label: Argo CD tracks (and would prune) objects by that label."""


class SecretError(RuntimeError):
    """A Secret could not be ensured; the message names namespace/name, never a value."""


@dataclass(frozen=True)
class WantedSecret:
    """A Secret the release needs: its name, the key pods read, and what the value looks like."""

    name: str
    key: str
    format: Format = "token"


def parse_wanted(spec: str) -> WantedSecret:
    """`NAME:KEY[:FORMAT]` -> WantedSecret; ValueError on anything else (argparse reports it)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"want NAME:KEY[:FORMAT], got {spec!r}")
    fmt = parts[2] if len(parts) == 3 else "token"
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} of {spec!r} is not one of {', '.join(FORMATS)}")
    return WantedSecret(parts[0], parts[1], cast(Format, fmt))


def new_value(fmt: Format) -> str:
    """A fresh random value in the given format."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return f"admin:{token}" if fmt == "desk" else token


class SecretsApi(Protocol):
    """The two calls of kubernetes.client.CoreV1Api this module makes."""

    def read_namespaced_secret(self, name: str, namespace: str) -> Any: ...

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> Any: ...


def decide(existing_data: dict[str, str] | None, key: str) -> Literal["create", "keep", "refuse"]:
    """create when there is no Secret (None), keep when it holds a non-empty `key`.

    refuse when the Secret exists without that key: it is never rewritten (someone else may own it).
    """
    if existing_data is None:
        return "create"
    return "keep" if existing_data.get(key) else "refuse"


def build_secret(wanted: WantedSecret, namespace: str) -> client.V1Secret:
    """The Secret to create, holding a fresh value under the wanted key."""
    meta = client.V1ObjectMeta(
        name=wanted.name,
        namespace=namespace,
        labels=dict(LABELS),
        annotations={"synpref/note": "made once by `synpref secrets ensure`; delete it and upgrade to rotate"},
    )
    return client.V1Secret(metadata=meta, type="Opaque", string_data={wanted.key: new_value(wanted.format)})


def ensure_secret(api: SecretsApi, namespace: str, wanted: WantedSecret) -> Literal["created", "kept"]:
    """Create `wanted` in `namespace` unless it exists; never changes an existing Secret."""
    where = f"Secret {namespace}/{wanted.name}"
    try:
        existing = api.read_namespaced_secret(wanted.name, namespace)
        data: dict[str, str] | None = existing.data or {}
    except client.ApiException as exc:
        if exc.status != 404:
            raise SecretError(f"reading {where} failed: HTTP {exc.status} {exc.reason}") from exc
        data = None
    action = decide(data, wanted.key)
    if action == "keep":
        return "kept"
    if action == "refuse":
        raise SecretError(f"{where} exists without key {wanted.key!r}: add it, or delete the Secret to have one made")
    try:
        api.create_namespaced_secret(namespace, build_secret(wanted, namespace))
    except client.ApiException as exc:
        if exc.status == 409:  # created since the read (a concurrent hook run): theirs stands
            return "kept"
        raise SecretError(f"creating {where} failed: HTTP {exc.status} {exc.reason}") from exc
    return "created"


def connect(kubeconfig: str | None = None, context: str | None = None) -> client.CoreV1Api:
    """In-cluster credentials when running in a pod, otherwise the kube config file."""
    return client.CoreV1Api(api_client(kubeconfig, context))


def _wanted_arg(spec: str) -> WantedSecret:
    try:
        return parse_wanted(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `synpref secrets ensure` options."""
    parser = argparse.ArgumentParser(prog="synpref secrets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    ensure = sub.add_parser("ensure", help="create each missing Secret with a random token; keep existing ones")
    ensure.add_argument("--namespace", required=True, help="namespace of the Secrets")
    ensure.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        required=True,
        type=_wanted_arg,
        metavar="NAME:KEY[:FORMAT]",
        help=f"a Secret to ensure (repeat); FORMAT is one of {', '.join(FORMATS)} (default token)",
    )
    ensure.add_argument("--kubeconfig", help="kube config file (default: in-cluster, then ~/.kube/config)")
    ensure.add_argument("--context", help="kube config context")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Ensure every --secret, printing `created` or `kept` per Secret.

    Returns 0 when all are there, 1 when one could not be ensured, 2 without credentials.
    """
    from kubernetes.config import ConfigException

    args = parse_args(argv)
    try:
        api = connect(args.kubeconfig, args.context)
    except ConfigException as exc:
        print(f"synpref secrets: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 2
    failed = False
    for wanted in args.secrets:
        try:
            outcome = ensure_secret(api, args.namespace, wanted)
        except SecretError as exc:
            print(f"synpref secrets: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{outcome} Secret {args.namespace}/{wanted.name} (key {wanted.key})")
    return 1 if failed else 0
