"""Issue 12, item 6: a pipeline service started without a service.host bound 0.0.0.0, so its
gRPC and metrics ports faced every network the machine is on. Outside the chart (which sets
0.0.0.0 for its pods on purpose) the default is now loopback."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml
from synpref_procs import Proc

from synpref.shared.config import ServiceSettings


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the one its default route uses), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def refuses(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return False
    except OSError:
        return True


def test_the_default_bind_address_is_loopback() -> None:
    assert ServiceSettings().host == "127.0.0.1"


def test_a_service_without_a_host_setting_listens_on_loopback_only(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"service": {"grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1}}))
    service = Proc("filter", ["filter", "--grpc-only"], config, tmp_path).start()
    try:
        service.wait_ready()
        match = re.search(r"ready: grpc=(\S+):(\d+) metrics=(\S+):(\d+)", service.text())
        assert match, service.text()[-2000:]
        assert match.group(1) == "127.0.0.1" and match.group(3) == "127.0.0.1", match.group(0)
        ports = int(match.group(2)), int(match.group(4))
        for port in ports:
            assert not refuses("127.0.0.1", port)
        outside = non_loopback_address()
        if outside is None:
            pytest.skip("this machine has no non-loopback address to try")
        for port in ports:
            assert refuses(outside, port), f"port {port} answers on {outside}"
    finally:
        code = service.stop()
    assert code == 0, service.text()[-3000:]
