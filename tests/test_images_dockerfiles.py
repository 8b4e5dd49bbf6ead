"""Both Dockerfiles, checked without a Docker daemon: pinned bases, numeric non-root user, an
entrypoint the package provides, pinned dependencies, no secrets, a tight build context."""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

import pytest

import dockerfile_reader as dfm

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": ROOT / "Dockerfile", "slim": ROOT / "images" / "slim" / "Dockerfile"}


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _lock(name: str = "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("which", list(DOCKERFILES))
def test_dockerfile_policy(which, scripts):
    df = dfm.load(DOCKERFILES[which])
    assert dfm.policy_problems(df, scripts) == []
    uid = dfm.user_of(df.final).split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000


def test_entrypoint_is_the_lever_console_script(scripts):
    target = scripts["lever"]
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    for path in DOCKERFILES.values():
        ep = dfm.load(path).final.last("ENTRYPOINT").exec_form()
        assert ep == ["lever"]


def test_gpu_image_is_cuda_and_installs_the_complete_cuda_lock():
    """The GPU image installs requirements-cuda.lock with --no-deps and checks it: the CPU lock's
    pins plus torch's CUDA build and the NVIDIA wheels it loads (no torchvision: not needed)."""
    df = dfm.load(DOCKERFILES["gpu"])
    assert df.final.base.startswith("nvidia/cuda:") and "runtime" in df.final.base
    args = df.final.args
    assert args["TORCH_VERSION"] == _lock()["torch"]
    assert args["PYTHON_VERSION"].startswith("3.11.")
    runs = " ".join(i.args for i in df.final.all("RUN"))
    assert "--no-deps -r /tmp/build/requirements-cuda.lock" in runs and "pip check" in runs
    cuda = _lock("requirements-cuda.lock")
    cpu = _lock()
    assert cuda["torch"] == cpu["torch"] and "torchvision" not in cuda
    assert {k: v for k, v in cuda.items() if k in cpu} == cpu  # the same pins for everything the CPU lock has
    assert {"triton", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cublas", "cuda-toolkit"} <= set(cuda)
    assert df.final.base.split(":")[1].startswith("13.0")  # the CUDA major the wheels are built for


def test_slim_image_is_cpu_only():
    df = dfm.load(DOCKERFILES["slim"])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", df.final.base)
    assert df.final.args["TORCH_INDEX"].endswith("/whl/cpu")
    assert df.final.args["TORCH_VERSION"] == _lock()["torch"]
    assert "cuda" not in DOCKERFILES["slim"].read_text().lower().replace("no cuda", "")


def test_lock_pins_every_dependency():
    for name in ("requirements.lock", "requirements-test.lock"):
        text = (ROOT / name).read_text()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*", line), (name, line)


def test_locks_are_complete():
    """Every installed distribution's requirements (this environment was installed from the locks
    with --no-deps) are themselves pinned in a lock: nothing reaches the install unpinned."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    pinned = {**_lock(), **_lock("requirements-test.lock")}
    missing = []
    for name in [*pinned, "lever"]:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            if r.name.lower().replace("_", "-") not in pinned:
                missing.append(f"{name} -> {r.name}")
    assert missing == []


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns we use (last match wins, ! re-includes)."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p + "/**") or (p == "**"):
            ignored = not neg
    return ignored


def test_build_context_is_tight():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for needed in ("pyproject.toml", "requirements.lock", "requirements-cuda.lock", "lever/cli/__init__.py",
                   "lever/config/presets/plan5.yaml"):
        assert not _ignored(needed, patterns), needed
    for kept_out in (".git/config", "tests/test_k8s_workflows.py", "workflows/plan5.yaml", "helm/lever/values.yaml",
                     ".venv/bin/python", "lever-store/x", "lever/cli/__pycache__/app.cpython-311.pyc",
                     "runs/model.safetensors", ".env"):
        assert _ignored(kept_out, patterns), kept_out
    # everything the Dockerfiles COPY from the context exists and is not ignored
    for path in DOCKERFILES.values():
        for ins in dfm.load(path).final.all("COPY"):
            if "--from=" in ins.args:
                continue
            src = ins.args.split()[0]
            assert (ROOT / src).exists() and not _ignored(src, patterns), src


@pytest.mark.parametrize("text,needle", [
    ("FROM python:latest\nUSER 1000\nENTRYPOINT [\"lever\"]\n", "not pinned"),
    ("FROM python\nUSER 1000\nENTRYPOINT [\"lever\"]\n", "not pinned"),
    ("FROM python:3.11-slim\nENTRYPOINT [\"lever\"]\n", "no USER"),
    ("FROM python:3.11-slim\nUSER root\nENTRYPOINT [\"lever\"]\n", "numeric UID"),
    ("FROM python:3.11-slim\nUSER 0:0\nENTRYPOINT [\"lever\"]\n", "root"),
    ("FROM python:3.11-slim\nUSER 1000\nENTRYPOINT lever\n", "exec-form"),
    ("FROM python:3.11-slim\nUSER 1000\nENTRYPOINT [\"levr\"]\n", "not a console script"),
    ("FROM python:3.11-slim\nENV AWS_SECRET_ACCESS_KEY=abc\nUSER 1000\nENTRYPOINT [\"lever\"]\n", "secret"),
    ("FROM python:3.11-slim\nRUN pip install \\\n    torch\nUSER 1000\nENTRYPOINT [\"lever\"]\n", "not pinned"),
    ("ARG BASE\nFROM ${BASE}\nUSER 1000\nENTRYPOINT [\"lever\"]\n", "unresolved"),
])
def test_policy_checks_catch_violations(text, needle, scripts):
    probs = dfm.policy_problems(dfm.parse(text), scripts)
    assert any(needle in p for p in probs), probs


def test_parser_handles_args_stages_and_continuations():
    df = dfm.parse(
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11.9-slim\nARG UV=ghcr.io/astral-sh/uv:0.9.5\n"
        "FROM ${UV} AS uv\nFROM $BASE AS app\nARG X=1\nRUN echo a \\\n  # comment inside\n  && echo b\n"
        "COPY --from=uv /uv /bin/uv\nUSER 10001:10001\nENTRYPOINT [\"lever\"]\n"
    )
    assert [(s.base, s.name) for s in df.stages] == [("ghcr.io/astral-sh/uv:0.9.5", "uv"), ("python:3.11.9-slim", "app")]
    assert df.final.all("RUN")[0].args == "echo a && echo b"
    assert df.final.args == {"X": "1"} and dfm.user_of(df.final) == "10001:10001"
