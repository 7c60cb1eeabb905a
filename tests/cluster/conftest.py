"""The namespace fixture of the cluster tests: a fresh namespace per test, deleted afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.kube import KUBECTL, _run, _skip_reason


@pytest.fixture
def namespace() -> Iterator[str]:
    reason = _skip_reason()
    if reason and os.environ.get("SYNPREF_CLUSTER_REQUIRED"):
        # tools/cluster/test.sh built and started the cluster: nothing may be missing now.
        pytest.fail(f"the cluster tools/cluster/test.sh started is not usable: {reason}")
    if reason:
        pytest.skip(reason)
    assert KUBECTL
    name = f"synpref-it-{uuid.uuid4().hex[:6]}"
    _run([KUBECTL, "create", "namespace", name])
    yield name
    # The kept PVCs and Secrets go with the namespace; the PVs are recycled for the next run.
    _run([KUBECTL, "delete", "namespace", name, "--wait=true", "--timeout=300s"], timeout=330, check=False)
