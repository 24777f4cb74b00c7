"""Workers as a Kubernetes Deployment: read and patch its `scale` subresource.

Kubernetes sends SIGTERM (Celery's warm shutdown) to a pod it removes; set the pod's
`terminationGracePeriodSeconds` above the longest batch so in-flight work finishes. The official
client is an optional extra: `pip install 'lmqueue[k8s]'`.
"""

from __future__ import annotations

import re
from typing import Any

from lmqueue.settings import Settings
from scheduler.backends.base import Backend


def deployment_name(template: str, model: str) -> str:
    """Fill "{model}" with a DNS-1123 form of the model name (lowercase, digits, '-')."""
    safe = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    return template.replace("{model}", safe)[:253]


def apps_api() -> Any:
    """The AppsV1Api for the cluster we run in, or the one in ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


class KubernetesBackend(Backend):
    def __init__(self, model: str, settings: Settings, api: Any = None) -> None:
        super().__init__(model)
        self.name = deployment_name(settings.scheduler_k8s_deployment, model)
        self.namespace = settings.scheduler_k8s_namespace
        self.api = api if api is not None else apps_api()

    def current(self) -> int:
        scale = self.api.read_namespaced_deployment_scale(self.name, self.namespace)
        return int(scale.spec.replicas or 0)

    def scale_to(self, n: int) -> None:
        self.api.patch_namespaced_deployment_scale(
            self.name, self.namespace, {"spec": {"replicas": n}}
        )
