"""The service shell without Kafka (--grpc-only): gRPC ProcessBatch/Status, health, reflection, metrics."""

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from synpref.shared.config import load_settings
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.service import Service, ServiceSpec
from synpref.shared.stage import StageResult
from synpref.v1 import pipeline_pb2, pipeline_pb2_grpc
from testing.passthrough import passthrough


def records(n):
    return [
        new_record(
            new_pair(
                [{"role": "user", "content": f"q{i}"}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": "b"}],
                source="unit",
            )
        )
        for i in range(n)
    ]


def spec(stage=None):
    return ServiceSpec(
        name="passthrough",
        stage=stage or passthrough("annotated"),
        input_route="raw",
        output_routes=["annotated"],
        grpc_service="synpref.v1.PassthroughService",
        add_servicer=pipeline_pb2_grpc.add_PassthroughServiceServicer_to_server,
    )


@pytest.fixture
def running():
    made = []

    def start(stage=None):
        ports = {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1}
        settings = load_settings(service=ports)
        service = Service(spec(stage), settings, kafka=False)
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not service.serving and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.serving, "service did not become ready in 10 s"
        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        made.append((service, thread, channel))
        return service, channel

    yield start
    for service, thread, channel in made:
        channel.close()
        service.stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_process_batch_runs_the_stage_and_status_counts_it(running):
    _, channel = running()
    stub = pipeline_pb2_grpc.PassthroughServiceStub(channel)
    batch = records(4)
    reply = stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=batch), timeout=5)
    assert [r.pair.id for r in reply.records] == [r.pair.id for r in batch]
    assert list(reply.failed_ids) == []
    status = stub.Status(pipeline_pb2.StatusRequest(), timeout=5)
    assert status.service == "passthrough" and status.serving
    # A stage route reads both stages' topics and writes to either.
    assert status.input_topic == "synpref.s1.raw,synpref.s2.raw"
    assert list(status.output_topics) == ["synpref.s1.annotated", "synpref.s2.annotated"]
    assert status.counters["grpc.processed"] == 4


def test_failures_and_exceptions_are_reported(running):
    def stage(batch):
        if len(batch) > 2:
            raise ValueError("too many")
        result = StageResult()
        result.fail(batch[0], "nope")
        return result

    _, channel = running(stage)
    stub = pipeline_pb2_grpc.PassthroughServiceStub(channel)
    one = records(1)
    reply = stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=one), timeout=5)
    assert list(reply.failed_ids) == [one[0].pair.id]
    with pytest.raises(grpc.RpcError) as err:
        stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=records(3)), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "too many" in err.value.details()


def test_health_reflection_and_metrics(running):
    service, channel = running()
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "synpref.v1.PassthroughService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in answer.list_services_response.service}
    assert {"synpref.v1.PassthroughService", "grpc.health.v1.Health"} <= names
    body = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    assert "synpref_runner_batch_seconds" in body


def test_stop_turns_health_off_and_closes_the_server(running):
    service, channel = running()
    service.stop.set()
    deadline = time.monotonic() + 10
    while service.serving and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not service.serving
    service.server.wait_for_termination(timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        pipeline_pb2_grpc.PassthroughServiceStub(channel).Status(pipeline_pb2.StatusRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_spec_rejects_unknown_routes():
    with pytest.raises(ValueError, match="unknown routes"):
        ServiceSpec(
            name="x",
            stage=passthrough("annotated"),
            input_route="raw",
            output_routes=["nowhere"],
            grpc_service="synpref.v1.PassthroughService",
            add_servicer=pipeline_pb2_grpc.add_PassthroughServiceServicer_to_server,
        )


def test_stopping_the_service_closes_the_stage_once_after_grpc_stops():
    # The annotator's judge sessions are released only through this hook (else aiohttp reports
    # "Unclosed client session" at every shutdown).
    closed: list[bool] = []
    service_spec = spec()
    service_spec.close = lambda: closed.append(service.server is not None and service.serving is False)
    settings = load_settings(service={"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 1})
    service = Service(service_spec, settings, kafka=False)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not service.serving and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.serving and closed == []
    service.stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and closed == [True]
