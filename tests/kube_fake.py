"""A loopback HTTP server implementing the few Kubernetes API endpoints `lever submit/status/
logs/runs/delete` call, and Argo Workflow status objects shaped as Argo's controller writes them.

The server speaks the real wire format, so the official ``kubernetes`` client runs unpatched
against it: bearer-token auth, ``Status`` error bodies, list objects, a ``?watch=true`` stream of
newline-delimited events in a chunked response, plain-text pod logs.

Status shapes follow Argo's types, ``pkg/apis/workflow/v1alpha1/workflow_types.go``
(``WorkflowStatus``: phase, startedAt, finishedAt, progress "N/M", message, nodes,
storedWorkflowTemplateSpec; ``NodeStatus``: id, name, displayName, type (DAG, TaskGroup, Retry,
Pod, Skipped), templateName, phase, boundaryID, children, inputs, outputs{result, exitCode},
message) and the node naming Argo uses for DAG tasks (``<parent>.<task>``, items as
``<task>(<index>:<value>)``, retry attempts as ``(<n>)`` appended).  The tests validate every
recorded state against the official Argo JSON schema (shared/schemas), which carries the same
``WorkflowStatus`` / ``NodeStatus`` definitions.  The pod label ``workflows.argoproj.io/workflow``
and the annotation ``workflows.argoproj.io/node-id`` are the ones Argo's controller puts on each
pod (``workflow/common/common.go``).
"""

from __future__ import annotations

import copy
import json
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

import yaml

WF_PREFIX = "/apis/argoproj.io/v1alpha1/namespaces/"
POD_PREFIX = "/api/v1/namespaces/"


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _selected(obj: dict, selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for part in filter(None, (selector or "").split(",")):
        k, _, v = part.partition("=")
        if labels.get(k) != v:
            return False
    return True


@dataclass
class FakeKube:
    """State of the fake API server; tests arrange it and read ``requests`` afterwards."""

    token: str = "good-token"
    expired_tokens: set = field(default_factory=lambda: {"expired-token"})
    forbidden_namespaces: set = field(default_factory=set)
    conflicts_left: int = 0  # the next N creates answer 409 AlreadyExists
    workflows: dict = field(default_factory=dict)  # (ns, name) -> object
    watch_states: dict = field(default_factory=dict)  # (ns, name) -> [later states to stream]
    pods: list = field(default_factory=list)  # pod objects (metadata.namespace set)
    logs: dict = field(default_factory=dict)  # pod name -> text
    requests: list = field(default_factory=list)  # (method, path, query dict, body)
    _rv: int = 100
    _suffix: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add_workflow(self, wf: dict, later: Optional[list] = None) -> None:
        ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
        wf = copy.deepcopy(wf)
        wf["metadata"]["resourceVersion"] = self.next_rv()
        self.workflows[(ns, name)] = wf
        if later:
            self.watch_states[(ns, name)] = [copy.deepcopy(s) for s in later]

    def created(self) -> list[dict]:
        return [r for r in self.requests if r[0] == "POST"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- helpers --------------------------------------------------------------------------
    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, reason: str, message: str) -> None:
        self._send(code, _status(code, reason, message))

    def _auth_ok(self, ns: str) -> bool:
        fake = self.server.fake
        got = self.headers.get("Authorization", "")
        token = got[len("Bearer "):] if got.startswith("Bearer ") else ""
        if token in fake.expired_tokens or token != fake.token:
            self._error(401, "Unauthorized", "Unauthorized")
            return False
        if ns in fake.forbidden_namespaces:
            self._error(403, "Forbidden", f'workflows.argoproj.io is forbidden: User "system:serviceaccount:ci:lever" '
                                          f'cannot access resource "workflows" in API group "argoproj.io" in the namespace "{ns}"')
            return False
        return True

    def _parse(self) -> tuple[str, dict, list[str]]:
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        return u.path, q, u.path.strip("/").split("/")

    def _record(self, body: Any = None) -> tuple[str, dict, list[str]]:
        path, q, parts = self._parse()
        with self.server.fake.lock:
            self.server.fake.requests.append((self.command, path, q, body))
        return path, q, parts

    # -- verbs ----------------------------------------------------------------------------
    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        path, q, parts = self._record(body)
        fake = self.server.fake
        if not path.startswith(WF_PREFIX) or len(parts) != 6:
            return self._error(404, "NotFound", f"the server could not find the requested resource ({path})")
        ns = parts[4]
        if not self._auth_ok(ns):
            return
        with fake.lock:
            meta = body.setdefault("metadata", {})
            if fake.conflicts_left > 0:
                fake.conflicts_left -= 1
                name = (meta.get("generateName") or "") + "taken"
                return self._error(409, "AlreadyExists", f'workflows.argoproj.io "{name}" already exists')
            if "name" not in meta:
                fake._suffix += 1
                meta["name"] = f"{meta['generateName']}{fake._suffix:05d}"
            if (ns, meta["name"]) in fake.workflows:
                return self._error(409, "AlreadyExists", f'workflows.argoproj.io "{meta["name"]}" already exists')
            meta["namespace"] = ns
            meta["uid"] = f"uid-{meta['name']}"
            meta["creationTimestamp"] = "2026-11-20T10:00:00Z"
            meta["resourceVersion"] = fake.next_rv()
            fake.workflows[(ns, meta["name"])] = body
        self._send(201, body)

    def do_DELETE(self) -> None:
        path, q, parts = self._record()
        fake = self.server.fake
        if not path.startswith(WF_PREFIX) or len(parts) != 7:
            return self._error(404, "NotFound", path)
        ns, name = parts[4], parts[6]
        if not self._auth_ok(ns):
            return
        with fake.lock:
            wf = fake.workflows.pop((ns, name), None)
        if wf is None:
            return self._error(404, "NotFound", f'workflows.argoproj.io "{name}" not found')
        self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "argoproj.io", "kind": "workflows", "uid": wf["metadata"].get("uid")}})

    def do_GET(self) -> None:
        path, q, parts = self._record()
        fake = self.server.fake
        if path.startswith(WF_PREFIX):
            ns = parts[4]
            if not self._auth_ok(ns):
                return
            if len(parts) == 7:
                wf = fake.workflows.get((ns, parts[6]))
                if wf is None:
                    return self._error(404, "NotFound", f'workflows.argoproj.io "{parts[6]}" not found')
                return self._send(200, wf)
            if q.get("watch") in ("true", "1", "True"):
                return self._watch(ns, q)
            items = [w for (wns, _), w in sorted(fake.workflows.items()) if wns == ns and _selected(w, q.get("labelSelector", ""))]
            return self._send(200, {"apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowList",
                                    "metadata": {"resourceVersion": str(fake._rv)}, "items": items})
        if path.startswith(POD_PREFIX) and len(parts) >= 5 and parts[4] == "pods":
            ns = parts[3]
            if not self._auth_ok(ns):
                return
            if len(parts) == 7 and parts[6] == "log":
                text = fake.logs.get(parts[5])
                if text is None:
                    return self._error(404, "NotFound", f'pods "{parts[5]}" not found')
                if q.get("tailLines"):
                    text = "\n".join(text.splitlines()[-int(q["tailLines"]):])
                return self._send(200, text, "text/plain")
            items = [p for p in fake.pods if p["metadata"]["namespace"] == ns and _selected(p, q.get("labelSelector", ""))]
            return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})
        self._error(404, "NotFound", f"the server could not find the requested resource ({path})")

    def _watch(self, ns: str, q: dict) -> None:
        """Stream the recorded later states of the named workflow as MODIFIED events, one JSON
        object per line in a chunked response, then end the stream (as a server timeout does)."""
        fake = self.server.fake
        name = q.get("fieldSelector", "").partition("metadata.name=")[2]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with fake.lock:
            states = fake.watch_states.pop((ns, name), [])
        for state in states:
            state = copy.deepcopy(state)
            state["metadata"]["resourceVersion"] = fake.next_rv()
            fake.workflows[(ns, name)] = state
            line = (json.dumps({"type": "MODIFIED", "object": state}) + "\n").encode()
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeKube

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client closing its keep-alive socket is normal
            super().handle_error(request, client_address)


class FakeKubeServer:
    """Context manager: the server on 127.0.0.1:<free port> in a thread."""

    def __init__(self, fake: Optional[FakeKube] = None):
        self.fake = fake or FakeKube()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self.fake
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeKubeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def kubeconfig(self, path: Path, *, token: Optional[str] = None, namespace: Optional[str] = "lever") -> Path:
        """A kubeconfig whose current context points at this server with a bearer token."""
        ctx: dict = {"cluster": "fake", "user": "ci"}
        if namespace:
            ctx["namespace"] = namespace
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "ci", "user": {"token": token or self.fake.token}}],
            "contexts": [{"name": "fake", "context": ctx}],
        }))
        return path


# ------------------------------------------------------------------ Argo status as the controller writes it


def node_id(wf: str, name: str) -> str:
    """Argo derives node ids from a hash of the node name (``wf-<fnv32a>``); crc32 stands in."""
    return f"{wf}-{zlib.crc32(name.encode())}"


class ArgoRun:
    """Builds the ``status.nodes`` of a Lever run step by step, as Argo's DAG executor does:
    root DAG ``main`` -> tasks ``baseline`` and ``pipeline`` (DAGs of template ``pipeline``) -> per
    stage a Retry node (template ``stage-X``) with Pod attempts; a fanned-out stage first has a
    ``list-X`` Retry/Pod whose ``outputs.result`` is the unit list, then a TaskGroup of Retry nodes,
    one per item.  ``snapshot()`` returns the whole Workflow object at that moment."""

    def __init__(self, workflow: dict, *, store: str, started: str = "2026-11-20T10:00:05Z"):
        self.wf = copy.deepcopy(workflow)
        self.name = self.wf["metadata"]["name"]
        self.nodes: dict[str, dict] = {}
        self.clock = 5
        self.phase = "Running"
        self.message = ""
        self.finished: Optional[str] = None
        self.started = started
        self.store = store
        root = self._node(self.name, "DAG", "main", None, phase="Running")
        self.root = root["id"]
        self.sections: dict[str, str] = {}

    def _t(self) -> str:
        self.clock += 7
        m, s = divmod(self.clock, 60)
        h, m = divmod(m, 60)
        return f"2026-11-20T{10 + h:02d}:{m:02d}:{s:02d}Z"

    def _node(self, name: str, ntype: str, template: str, parent: Optional[str], *, boundary: Optional[str] = None,
              phase: str = "Running", display: Optional[str] = None, **extra: Any) -> dict:
        nid = node_id(self.name, name)
        n = {"id": nid, "name": name, "displayName": display or name.rsplit(".", 1)[-1], "type": ntype,
             "templateName": template, "templateScope": "namespaced/lever-pipeline", "phase": phase,
             "startedAt": self._t(), **extra}
        if boundary:
            n["boundaryID"] = boundary
        self.nodes[nid] = n
        if parent:
            self.nodes[parent].setdefault("children", []).append(nid)
        return n

    def _finish(self, n: dict, phase: str, **extra: Any) -> None:
        n["phase"] = phase
        n["finishedAt"] = self._t()
        n.update(extra)

    def section(self, task: str) -> str:
        """Start the DAG task ``baseline`` or ``pipeline`` (template ``pipeline``)."""
        n = self._node(f"{self.name}.{task}", "DAG", "pipeline", self.root, boundary=self.root)
        self.sections[task] = n["id"]
        return n["id"]

    def unit(self, section: str, template: str, task_display: str, *, parent: Optional[str] = None,
             attempts: tuple = (("Succeeded", "0"),), unit_id: Optional[str] = None,
             result: Optional[str] = None) -> dict:
        """One Retry node with Pod attempts (each (phase, exitCode)); returns the Retry node."""
        sec = self.sections[section]
        base = f"{self.nodes[sec]['name']}.{task_display}"
        inputs = {"parameters": [{"name": "unit-id", "value": unit_id}]} if unit_id else None
        retry = self._node(base, "Retry", template, parent or sec, boundary=sec, display=task_display,
                           **({"inputs": inputs} if inputs else {}))
        final = "Succeeded"
        for i, (phase, code) in enumerate(attempts):
            pod = self._node(f"{base}({i})", "Pod", template, retry["id"], boundary=sec,
                             display=f"{task_display}({i})", hostNodeName="gpu-node-3",
                             **({"inputs": inputs} if inputs else {}))
            outputs: dict = {"exitCode": code}
            if result is not None and phase == "Succeeded":
                outputs["result"] = result
            msg = {"2": "Error (exit code 2)", "137": "OOMKilled (exit code 137)"}.get(code, "")
            self._finish(pod, phase, outputs=outputs, **({"message": msg} if msg else {}))
            final = phase
        self._finish(retry, final, **({"outputs": {"exitCode": attempts[-1][1], "result": result}} if result else {}))
        if final != "Succeeded":
            retry["message"] = f"No more retries left"
        return retry

    def task_group(self, section: str, task: str) -> str:
        sec = self.sections[section]
        return self._node(f"{self.nodes[sec]['name']}.{task}", "TaskGroup", "stage-" + task, sec, boundary=sec)["id"]

    def end_group(self, gid: str, phase: str) -> None:
        self._finish(self.nodes[gid], phase)

    def end_section(self, section: str, phase: str) -> None:
        self._finish(self.nodes[self.sections[section]], phase)

    def exit_handler(self, phase: str = "Succeeded") -> None:
        on_exit = self._node(f"{self.name}.onExit", "DAG", "exit-handler", None, display=f"{self.name}.onExit")
        self.sections["onExit"] = on_exit["id"]
        self.unit("onExit", "summarize-partial", "summarize", attempts=((phase, "0"),))
        self._finish(on_exit, phase)

    def end(self, phase: str, message: str = "") -> None:
        self.phase, self.message = phase, message
        self._finish(self.nodes[self.root], phase)
        self.finished = self._t()

    def snapshot(self) -> dict:
        wf = copy.deepcopy(self.wf)
        pods = [n for n in self.nodes.values() if n["type"] == "Pod"]
        done = sum(n["phase"] == "Succeeded" for n in pods)
        status: dict = {"phase": self.phase, "startedAt": self.started, "progress": f"{done}/{len(pods)}",
                        "nodes": copy.deepcopy(self.nodes),
                        "storedWorkflowTemplateSpec": {"entrypoint": "main", "arguments": {"parameters": [
                            {"name": "profile", "value": "cluster"}, {"name": "store", "value": self.store},
                            {"name": "run-id", "value": ""}, {"name": "overrides", "value": "[]"},
                            {"name": "baseline", "value": "baseline"}]}}}
        if self.message:
            status["message"] = self.message
        if self.finished:
            status["finishedAt"] = self.finished
        wf["status"] = status
        wf["metadata"].setdefault("labels", {})["lever.dev/run-id"] = self.name
        return wf

    def pod_objects(self, namespace: str, stage_of_template) -> list[dict]:
        """The pods that remain after podGC OnPodSuccess: the failed ones, labelled and annotated as
        Argo's controller and Lever's templates do."""
        out = []
        for n in self.nodes.values():
            if n["type"] != "Pod" or n["phase"] == "Succeeded":
                continue
            pod = f"{self.name}-{n['templateName']}-{zlib.crc32(n['name'].encode()) % 10**10}"
            out.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace, "creationTimestamp": n["startedAt"],
                             "labels": {"workflows.argoproj.io/workflow": self.name,
                                        "lever.dev/stage": stage_of_template(n["templateName"]),
                                        "lever.dev/run-id": self.name},
                             "annotations": {"workflows.argoproj.io/node-id": n["id"],
                                             "workflows.argoproj.io/node-name": n["name"]}},
                "spec": {"containers": [{"name": "wait", "image": "argoexec"}, {"name": "main", "image": "lever"}]},
                "status": {"phase": "Failed"},
            })
        return out
