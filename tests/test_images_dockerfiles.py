"""Both Dockerfiles, checked without a Docker daemon: pinned bases, numeric non-root user, an
entrypoint the package provides, pinned dependencies, no secrets, a tight build context."""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from lever.platform import dockerfile as dfm

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": ROOT / "Dockerfile", "slim": ROOT / "images" / "slim" / "Dockerfile"}


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
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


def test_gpu_image_is_cuda_and_installs_the_locked_torch():
    df = dfm.load(DOCKERFILES["gpu"])
    assert df.final.base.startswith("nvidia/cuda:") and "runtime" in df.final.base
    args = df.final.args
    assert args["TORCH_VERSION"] == _lock()["torch"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    assert args["PYTHON_VERSION"].startswith("3.11.")
    runs = " ".join(i.args for i in df.final.all("RUN"))
    assert "requirements.lock" in runs and '"torch==${TORCH_VERSION}"' in runs


def test_slim_image_is_cpu_only():
    df = dfm.load(DOCKERFILES["slim"])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", df.final.base)
    assert df.final.args["TORCH_INDEX"].endswith("/whl/cpu")
    assert df.final.args["TORCH_VERSION"] == _lock()["torch"]
    assert "cuda" not in DOCKERFILES["slim"].read_text().lower().replace("no cuda", "")


def test_lock_pins_every_dependency():
    text = (ROOT / "requirements.lock").read_text()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9A-Za-z.+-]*", line), line


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
    for needed in ("pyproject.toml", "requirements.lock", "lever/cli/__init__.py", "lever/config/presets/plan5.yaml"):
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
