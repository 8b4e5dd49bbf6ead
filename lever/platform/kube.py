"""A thin layer over the official ``kubernetes`` client: Argo Workflow objects and their pods.

Why thin: the tests talk to a loopback HTTP server that imitates the few Kubernetes endpoints
used here, so everything below the calls in this module (kubeconfig loading, token auth, URL
building, JSON decoding, the watch stream) is the real client's code.  What the fake server
cannot prove is what a real API server and Argo's controller do with the objects; that is kept
to plain CRUD, one watch and one log read (docs/kubernetes.md lists what was not verified).

Every failure becomes a ``KubeError`` carrying one line for the user and an exit code: 2 for
what the user must fix (no credentials, expired token, forbidden, no such run), 1 for the rest
(cluster unreachable, a conflict that persisted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

GROUP = "argoproj.io"
VERSION = "v1alpha1"
PLURAL = "workflows"
MAIN_CONTAINER = "main"  # Argo's name for a container template's own container
# Labels and annotations Argo's controller puts on every pod it creates (common.LabelKeyWorkflow,
# common.AnnotationKeyNodeID in Argo's workflow/common/common.go).
ARGO_WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
ARGO_NODE_ID_ANNOTATION = "workflows.argoproj.io/node-id"
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
USER_ERROR = 2


class KubeError(Exception):
    """One line the CLI prints as is, and the exit code it exits with."""

    def __init__(self, message: str, exit_code: int = 1, status: Optional[int] = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status  # the HTTP status of an API error, None for the rest


def _kubeconfig_path(explicit: Optional[str]) -> Optional[str]:
    """The first kubeconfig file that exists (explicit, each entry of $KUBECONFIG, ~/.kube/config)."""
    if explicit:
        return explicit
    env = os.environ.get("KUBECONFIG", "")
    for part in (p for p in env.split(os.pathsep) if p):
        if Path(part).expanduser().is_file():
            return str(Path(part).expanduser())
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() and not env else None


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


@dataclass
class Kube:
    """An API client bound to one namespace (``-n``, else the kubeconfig context's, else the
    pod's own in-cluster namespace, else ``default_namespace``)."""

    api_client: Any
    namespace: str
    source: str  # where the credentials came from, for error messages

    # -- plumbing -----------------------------------------------------------------------
    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, not_found: Optional[str] = None,
              **kwargs: Any) -> Any:
        """Run one API call; translate its failure into a ``KubeError`` naming ``what`` was tried."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise self._api_error(exc, what, not_found) from None
        except HTTPError as exc:  # refused, DNS, TLS: not the user's input, maybe transient
            raise KubeError(f"cannot reach the Kubernetes API at {self.host} ({what}): {exc}", 1) from None

    def _api_error(self, exc: Any, what: str, not_found: Optional[str]) -> KubeError:
        err = self._api_error_line(exc, what, not_found)
        err.status = exc.status
        return err

    def _api_error_line(self, exc: Any, what: str, not_found: Optional[str]) -> KubeError:
        reason = _status_message(exc)
        if exc.status == 401:
            return KubeError(f"the Kubernetes API at {self.host} refused the credentials from {self.source} "
                             f"(401 Unauthorized: the token is expired or invalid); log in again and retry", USER_ERROR)
        if exc.status == 403:
            return KubeError(f"forbidden to {what} in namespace {self.namespace} (403: {reason}); "
                             f"ask for RBAC on {GROUP} {PLURAL} / pods or pick another namespace with -n", USER_ERROR)
        if exc.status == 404:
            return KubeError(not_found or f"{what}: not found (404: {reason})", USER_ERROR)
        if exc.status == 409:
            return KubeError(f"{what}: conflict (409: {reason})", 1)
        return KubeError(f"{what} failed: HTTP {exc.status} {reason}", 1)

    # -- workflows ----------------------------------------------------------------------
    def create_workflow(self, body: dict, attempts: int = 3) -> dict:
        """Create one Workflow.  With ``generateName`` a 409 means the server's random suffix
        collided with an existing run; the next try draws a new one, so it is retried."""
        last: Optional[KubeError] = None
        for _ in range(attempts if body.get("metadata", {}).get("generateName") else 1):
            try:
                return self._call("create a Workflow", self._custom().create_namespaced_custom_object,
                                  GROUP, VERSION, self.namespace, PLURAL, body,
                                  not_found=f"the {GROUP}/{VERSION} Workflow kind is not served by {self.host} "
                                            f"(is Argo Workflows installed?)")
            except KubeError as exc:
                if exc.status != 409:
                    raise
                last = exc
        assert last is not None
        raise last

    def get_workflow(self, name: str) -> dict:
        return self._call(f"get workflow {name}", self._custom().get_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, name,
                          not_found=f"no workflow {name!r} in namespace {self.namespace}")

    def list_workflows(self, label_selector: str = "") -> list[dict]:
        out = self._call("list workflows", self._custom().list_namespaced_custom_object,
                         GROUP, VERSION, self.namespace, PLURAL, label_selector=label_selector)
        return list(out.get("items") or [])

    def delete_workflow(self, name: str) -> None:
        """Delete a Workflow; its pods go with it (Argo makes the Workflow their owner)."""
        self._call(f"delete workflow {name}", self._custom().delete_namespaced_custom_object,
                   GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Background",
                   not_found=f"no workflow {name!r} in namespace {self.namespace}")

    def watch_workflow(self, name: str, resource_version: str, timeout_s: int = 300) -> Iterator[dict]:
        """The Workflow's successive states from ``resource_version`` on (a Kubernetes watch,
        one object per event) until the server closes the stream after ``timeout_s``.  A 410
        (the version is too old) ends the iteration; the caller re-reads and watches again."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        w = watch.Watch()
        try:
            stream = w.stream(self._custom().list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              PLURAL, field_selector=f"metadata.name={name}", resource_version=resource_version,
                              timeout_seconds=timeout_s)
            while True:
                try:
                    event = next(stream)
                except StopIteration:
                    return
                except ApiException as exc:
                    if exc.status == 410:
                        return
                    raise self._api_error(exc, f"watch workflow {name}", None) from None
                except Exception as exc:  # noqa: BLE001 - urllib3 errors mid-stream
                    from urllib3.exceptions import HTTPError

                    if isinstance(exc, HTTPError):
                        raise KubeError(f"watch of {name} at {self.host} broke: {exc}", 1) from None
                    raise
                if event.get("type") == "ERROR":
                    return
                obj = event.get("object")
                if isinstance(obj, dict) and event.get("type") in ("ADDED", "MODIFIED"):
                    yield obj
                elif event.get("type") == "DELETED":
                    raise KubeError(f"workflow {name} was deleted while being watched", 1)
        finally:
            w.stop()

    # -- pods ---------------------------------------------------------------------------
    def list_pods(self, label_selector: str) -> list[Any]:
        return list(self._call("list pods", self._core().list_namespaced_pod, self.namespace,
                               label_selector=label_selector).items)

    def pod_log(self, pod: str, container: str = MAIN_CONTAINER, tail_lines: Optional[int] = None) -> str:
        kwargs = {"tail_lines": tail_lines} if tail_lines else {}
        return self._call(f"read the log of pod {pod}", self._core().read_namespaced_pod_log, pod, self.namespace,
                          container=container,
                          not_found=f"pod {pod} is gone (succeeded pods are deleted by podGC; "
                                    f"see the store's artifacts or Argo's archived logs)", **kwargs)


def _status_message(exc: Any) -> str:
    """The ``message`` of the Status object a Kubernetes API error carries, else its reason."""
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def connect(namespace: Optional[str] = None, *, context: Optional[str] = None, kubeconfig: Optional[str] = None,
            default_namespace: str = "default") -> Kube:
    """A client from the kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``) or,
    inside a pod, the service account's token.  Raises ``KubeError`` (exit 2) when neither exists."""
    from kubernetes import config
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.config.config_exception import ConfigException

    path = _kubeconfig_path(kubeconfig)
    if path is None and not kubeconfig and _in_cluster():
        cfg = Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except ConfigException as exc:
            raise KubeError(f"in-cluster Kubernetes credentials unusable: {exc}", USER_ERROR) from None
        ns = namespace
        if not ns and IN_CLUSTER_NAMESPACE_FILE.is_file():
            ns = IN_CLUSTER_NAMESPACE_FILE.read_text().strip()
        return Kube(ApiClient(cfg), ns or default_namespace, "the pod's service account")
    if path is None or not Path(path).is_file():
        where = path or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        raise KubeError(f"no Kubernetes credentials: no kubeconfig at {where} and not running in a pod; "
                        f"set KUBECONFIG (or --kubeconfig), or submit through the Argo server with "
                        f"--via argo-server and ARGO_SERVER", USER_ERROR)
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
        chosen = active
        if context:
            chosen = next((c for c in contexts if c.get("name") == context), None)
            if chosen is None:
                raise KubeError(f"{path}: no context {context!r} (have: "
                                f"{', '.join(c.get('name', '?') for c in contexts)})", USER_ERROR)
        api_client = config.new_client_from_config(config_file=path, context=context, persist_config=False)
    except ConfigException as exc:
        raise KubeError(f"{path}: unusable kubeconfig: {exc}", USER_ERROR) from None
    ns = namespace or (chosen or {}).get("context", {}).get("namespace") or default_namespace
    return Kube(api_client, ns, path)
