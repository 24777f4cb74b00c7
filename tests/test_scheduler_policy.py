"""The scaling policy and the command-line / API backends, as pure units (no processes)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lmqueue.settings import Settings
from scheduler.backends.base import Backend
from scheduler.backends.compose import ComposeBackend
from scheduler.backends.kubernetes import KubernetesBackend, deployment_name
from scheduler.backlog import Backlog
from scheduler.loop import ModelScaler, TickTimer
from scheduler.policy import Hysteresis, Limits, desired_workers

pytestmark = pytest.mark.timeout(30)

LIMITS = Limits(
    min_workers=0, max_workers=4, target_per_worker=10, upscale_delay_s=3, downscale_delay_s=60
)


@pytest.mark.parametrize(
    ("backlog", "want"), [(0, 0), (1, 1), (10, 1), (11, 2), (39, 4), (1000, 4)]
)
def test_desired_is_ceil_of_backlog_over_target_clamped(backlog: int, want: int) -> None:
    assert desired_workers(backlog, LIMITS) == want
    floor_one = Limits(1, 4, 10, 0, 0)
    assert desired_workers(backlog, floor_one) == max(1, want)


def test_backlog_counts_work_in_progress_once() -> None:
    assert Backlog(waiting=5, reserved=3, running=3).total == 8
    assert Backlog(waiting=0, reserved=32, running=32).total == 32  # one busy worker, no queue
    assert Backlog(waiting=0, reserved=0, running=4).total == 4
    # A bulk batch: 4 messages of 32 job ids each count as their 128 jobs.
    assert Backlog(waiting=4, reserved=0, running=0, queued=128).total == 128
    assert Backlog(waiting=3, reserved=1, running=32, queued=96).total == 128


def test_from_zero_is_immediate_otherwise_upscale_waits() -> None:
    h = Hysteresis(upscale_delay_s=3, downscale_delay_s=60)
    assert h.decide(0.0, current=0, desired=2)[0] == 2
    assert h.decide(1.0, current=2, desired=4)[0] == 2
    assert h.decide(2.0, current=2, desired=4)[0] == 2
    target, why = h.decide(3.5, current=2, desired=4)
    assert target == 4 and why.startswith("scale up")


def test_upscale_needs_demand_sustained_over_the_window() -> None:
    h = Hysteresis(upscale_delay_s=3, downscale_delay_s=60)
    h.decide(0.0, current=1, desired=1)
    h.decide(1.0, current=1, desired=3)
    h.decide(2.0, current=1, desired=1)  # a blip back down
    assert h.decide(3.5, current=1, desired=3)[0] == 1
    assert h.decide(5.5, current=1, desired=3)[0] == 3


def test_downscale_only_after_the_lull_lasts_and_to_the_window_peak() -> None:
    h = Hysteresis(upscale_delay_s=0, downscale_delay_s=10)
    for t in range(0, 10):
        assert h.decide(float(t), current=3, desired=0 if t != 4 else 2)[0] == 3
    assert h.decide(10.0, current=3, desired=0)[0] == 2  # the peak (2) of the last 10 s
    assert h.decide(15.0, current=2, desired=0)[0] == 0  # t=4 left the window


# --- docker compose ---------------------------------------------------------------------------


def test_compose_commands() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str]) -> str:
        calls.append(argv)
        return "c1\nc2\n\n" if "ps" in argv else ""

    s = Settings(scheduler_compose_file="deploy/compose.yml", scheduler_compose_service="w-{model}")
    b = ComposeBackend("Org/Model.v1", s, run=run)
    assert b.current() == 2
    b.scale_to(5)
    assert calls == [
        [
            "docker",
            "compose",
            "-f",
            "deploy/compose.yml",
            "ps",
            "--quiet",
            "--status",
            "running",
            "w-org-model-v1",
        ],
        [
            "docker",
            "compose",
            "-f",
            "deploy/compose.yml",
            "up",
            "-d",
            "--scale",
            "w-org-model-v1=5",
            "--no-recreate",
            "w-org-model-v1",
        ],
    ]
    assert ComposeBackend("m", Settings(), run=run).scale_argv(0) == [
        "docker",
        "compose",
        "up",
        "-d",
        "--scale",
        "worker=0",
        "--no-recreate",
        "worker",
    ]


# --- kubernetes -------------------------------------------------------------------------------


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeAppsV1:
    """The two AppsV1Api calls the backend makes, with the same signatures."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    def read_namespaced_deployment_scale(self, name: str, namespace: str) -> Any:
        return _Obj(spec=_Obj(replicas=self.replicas))

    def patch_namespaced_deployment_scale(
        self, name: str, namespace: str, body: dict[str, Any]
    ) -> Any:
        self.patches.append((name, namespace, body))
        self.replicas = body["spec"]["replicas"]
        return _Obj(spec=_Obj(replicas=self.replicas))


def test_kubernetes_patches_the_deployment_scale() -> None:
    api = FakeAppsV1(replicas=1)
    s = Settings(scheduler_k8s_namespace="inference")
    b = KubernetesBackend("meta-llama/Llama-3.2-1B", s, api=api)
    assert b.name == "lmqueue-worker-meta-llama-llama-3-2-1b"
    assert b.current() == 1
    b.scale_to(3)
    assert api.patches == [(b.name, "inference", {"spec": {"replicas": 3}})]
    assert b.current() == 3
    assert deployment_name("w-{model}", "__X__") == "w-x"


class _FakeScaleApi(BaseHTTPRequestHandler):
    """The deployment `scale` subresource of one API server, over real HTTP."""

    replicas = 1
    patches: list[Any] = []

    def _answer(self) -> None:
        body = json.dumps(
            {"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": self.replicas}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def do_PATCH(self) -> None:  # noqa: N802
        patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).patches.append((self.path, patch))
        type(self).replicas = patch["spec"]["replicas"]
        self._answer()

    def log_message(self, *_args: Any) -> None:
        pass


def test_kubernetes_backend_speaks_to_the_api_server_through_the_official_client() -> None:
    client = pytest.importorskip("kubernetes.client")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeScaleApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        api = client.AppsV1Api(client.ApiClient(config))
        b = KubernetesBackend("tiny", Settings(scheduler_k8s_namespace="inference"), api=api)
        assert b.current() == 1
        b.scale_to(4)
        assert b.current() == 4
        path = f"/apis/apps/v1/namespaces/inference/deployments/{b.name}/scale"
        assert _FakeScaleApi.patches == [(path, {"spec": {"replicas": 4}})]
    finally:
        server.shutdown()


# --- one model's scaler with a fake backend ---------------------------------------------------


class FakeBackend(Backend):
    def __init__(self, n: int = 0, floor: int = 0, acts: bool = True) -> None:
        super().__init__("m")
        self.n, self._floor, self.acts, self.calls = n, floor, acts, []  # type: ignore[misc]

    def current(self) -> int:
        return self.n

    def floor(self) -> int:
        return self._floor

    def scale_to(self, n: int) -> None:
        self.calls.append(n)
        self.n = n


def test_scaler_records_each_decision_once_and_never_retires_the_floor() -> None:
    limits = Limits(0, 3, 10, upscale_delay_s=0, downscale_delay_s=0)
    backend = FakeBackend(n=0, floor=0)
    scaler = ModelScaler("m", "q.m", backend, limits)
    d1 = scaler.step(Backlog(25, 0, 0), 0.0)
    assert (d1.current, d1.desired, d1.target) == (0, 3, 3) and backend.calls == [3]
    assert scaler.worth_recording(d1)
    d2 = scaler.step(Backlog(20, 3, 3), 1.0)
    assert scaler.worth_recording(d2)  # current changed 0 -> 3
    d3 = scaler.step(Backlog(24, 5, 3), 2.0)
    assert not scaler.worth_recording(d3), "same decision, other figures: no new row"
    backend._floor = 2
    d4 = scaler.step(Backlog(0, 0, 0), 3.0)
    assert d4.target == 2 and backend.calls == [3, 2] and "floor" in d4.reason


def test_advisory_backend_is_never_asked_to_scale() -> None:
    backend = FakeBackend(n=1, floor=1, acts=False)
    scaler = ModelScaler("m", "q.m", backend, Limits(0, 3, 10, 0, 0))
    d = scaler.step(Backlog(30, 0, 0), 0.0)
    assert d.desired == 3 and backend.calls == []


def test_keda_example_watches_every_priority_list_of_the_queue() -> None:
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from lmqueue.contract import redis_key_prefix, redis_queue_keys
    from lmqueue.settings import Settings

    docs = list(
        yaml.safe_load_all(
            (Path(__file__).parent.parent / "deploy/keda-scaledobject.yaml").read_text()
        )
    )
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "password"
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    settings = Settings(deployment="lmqueue")  # the namespace the example's comment sets
    for name, doc in scaled.items():  # one ScaledObject per model, each on its Deployment
        model = name.removeprefix("lmqueue-worker-")
        assert doc["spec"]["scaleTargetRef"]["name"] == settings.scheduler_k8s_deployment.format(
            model=model
        )
        assert doc["spec"]["minReplicaCount"] == 0
    redis_triggers = [t for t in scaled["lmqueue-worker-tiny"]["spec"]["triggers"]]
    lists = [t["metadata"]["listName"] for t in redis_triggers]
    assert lists == redis_queue_keys("lmqueue.tiny", redis_key_prefix(settings))
    for t in redis_triggers:
        assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
        # The threshold is what one worker holds: its concurrency (2 x its slots).
        assert int(t["metadata"]["listLength"]) == Settings().effective_concurrency()
    (prom,) = scaled["lmqueue-worker-chat"]["spec"]["triggers"]
    assert 'lmqueue_scheduler_backlog{model="chat"}' in prom["metadata"]["query"]
    assert int(prom["metadata"]["threshold"]) == Settings().effective_concurrency()


def test_a_slow_reconcile_pass_is_logged_with_its_parts(caplog: pytest.LogCaptureFixture) -> None:
    timer = TickTimer()
    with timer("poll"):
        pass
    with timer("reaper"):
        time.sleep(0.02)
    timer.warn_if_slow(60.0)
    assert not caplog.records  # a pass within the limit says nothing
    timer.warn_if_slow(0.01)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "slow scheduler pass" in record.message and "reaper 0.0" in record.message
