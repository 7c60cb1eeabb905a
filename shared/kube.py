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
    # One try per request: urllib3's default (3 retries of a failed connect or read, GET's read timeouts included)
    # made one silent read take 4 request timeouts before the caller's own back-off (the controller's, `wait`'s poll)
    # saw it; a failure now reaches it at once, as urllib3.exceptions.MaxRetryError (a transient HTTPError).
    configuration.retries = 0
    return client.ApiClient(configuration)
