"""The Kubernetes API client the project's commands use: in a pod its service account, else a kube config."""

from __future__ import annotations

from kubernetes import client


def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod (and no kube config was asked for), otherwise the kube
    config file (`kubeconfig`, default ~/.kube/config or $KUBECONFIG) and its `context`.
    """
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig or context:
            raise kube_config.ConfigException("kube config requested explicitly")
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        kube_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return client.ApiClient(configuration)
