"""Models as provisioned artifacts: where a configured model name resolves to a local directory.

Why: on the cluster ~64 GPU pods per plan each need the same 7.5 GB checkpoint.  Downloading it
from the hub in every pod (into an empty per-pod cache, at whatever revision ``main`` is that
day) costs ~480 GB of transfer per plan and makes results depend on the day.  Instead a one-time
``lever models pull`` snapshots each model at its pinned revision into a *models root* -- a
directory on a model volume, or an S3 prefix -- and stage pods read it from there with
``HF_HUB_OFFLINE=1``.  A model that is not provisioned is a user error (exit 2, never retried),
not a download.

A configured name resolves as follows (``lvlm.name`` / ``encoder.name`` with their ``revision``):

* ``s3://bucket/prefix/<org>--<name>/<revision>``: that snapshot, downloaded to the local
  cache with every file's sha256 checked (the artifact store does it);
* a local directory (absolute, ``./``, ``~``, or any existing path): used as is; if it carries a
  ``lever-model.json`` from ``lever models pull`` its revision must match a configured one;
* a hub id ``org/name``: needs a pinned ``revision``; looked up in ``models.root`` as
  ``<org>--<name>/<revision>/`` (a committed snapshot: manifest present, every file there
  with its recorded size), then in the Hugging Face cache (offline); otherwise the error names
  both places and the command that provisions it.

Snapshots use the artifact-store layout (``_manifest.json`` with sha256 and sizes, committed
atomically), so the same code writes them to a directory or to S3.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lever.io import atomic_write_json
from lever.errors import StageError

log = logging.getLogger(__name__)

MARKER = "lever-model.json"
# what a snapshot keeps: configs, tokenizer and template files, safetensors weights (no pickled
# *.bin / *.pt, no TF/Flax/ONNX copies the hub repos also carry)
ALLOW_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelRef:
    """One model a plan needs: which config section names it, its name and pinned revision."""

    field: str  # "lvlm" or "encoder" (used in messages: "lvlm.name: ...")
    name: str
    revision: Optional[str]

    @property
    def key(self) -> str:
        return snapshot_key(self.name, self.revision or "")


def is_s3(name: str) -> bool:
    return name.startswith("s3://")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing path and does not look like one."""
    if is_s3(name) or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    return bool(_HUB_ID.match(name))


def slug(repo: str) -> str:
    """``Qwen/Qwen2.5-VL-3B-Instruct`` -> ``Qwen--Qwen2.5-VL-3B-Instruct`` (one key part)."""
    return repo.replace("/", "--")


def snapshot_key(repo: str, revision: str) -> str:
    return f"{slug(repo)}/{revision}"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _split_s3(url: str) -> tuple[str, str]:
    """``s3://b/p/<org>--<name>/<rev>`` -> (models root ``s3://b/p``, key ``<org>--<name>/<rev>``)."""
    parts = url.rstrip("/")[len("s3://"):].split("/")
    if len(parts) < 3:
        raise StageError(f"{url}: an s3:// model must name a snapshot: s3://BUCKET[/PREFIX]/<org>--<name>/<revision>")
    return "s3://" + "/".join(parts[:-2]), "/".join(parts[-2:])


def snapshot_problems(directory: Path) -> Optional[list[str]]:
    """None when ``directory`` holds no committed snapshot; else what is wrong with it ([] = fine).

    Sizes only: a model volume is written once by ``lever models pull`` (which hashed every file)
    and mounted read-only; hashing 7.5 GB in every pod would cost more than the model load."""
    import json

    mf = directory / "_manifest.json"
    if not mf.is_file():
        return None
    try:
        files = json.loads(mf.read_text()).get("files", {})
    except (OSError, ValueError) as exc:
        return [f"_manifest.json unreadable: {exc}"]
    problems = []
    for rel, info in files.items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info.get("size"):
            problems.append(f"{rel}: size {p.stat().st_size} != {info.get('size')}")
    return problems


def _check_marker(directory: Path, ref: ModelRef) -> None:
    import json

    marker = directory / MARKER
    if ref.revision and marker.is_file():
        recorded = json.loads(marker.read_text()).get("revision")
        if recorded and recorded != ref.revision:
            raise StageError(f"{ref.field}.revision: {directory} holds revision {recorded}, "
                             f"the plan pins {ref.revision}")


def _from_store(store_url: str, key: str, ref: ModelRef) -> Path:
    from lever.storage.backends import open_store
    from lever.storage.store import CorruptArtifact

    store = open_store(store_url)
    try:
        return store.open(key)
    except KeyError:
        raise StageError(f"{ref.field}.name: {ref.name}@{ref.revision or '?'} is not provisioned in "
                         f"{store.location(key)}; run `lever models pull` (docs/kubernetes.md)") from None
    except CorruptArtifact as exc:
        raise StageError(f"{ref.field}.name: the snapshot at {store.location(key)} is damaged ({exc}); "
                         "pull it again with `lever models pull --force`") from None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says *now* (huggingface_hub reads it once,
    at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _hf_cache(ref: ModelRef) -> Optional[Path]:
    """The snapshot in the Hugging Face cache, never a download."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(ref.name, revision=ref.revision, local_files_only=True, cache_dir=str(hf_cache_dir()),
                                 allow_patterns=list(ALLOW_PATTERNS))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None
    p = Path(path)
    return p if (p / "config.json").is_file() else None


def resolve(ref: ModelRef, root: Optional[str]) -> Path:
    """The local directory to ``from_pretrained`` ``ref`` from (see the module docstring)."""
    name = ref.name
    if is_s3(name):
        store_url, key = _split_s3(name)
        return _from_store(store_url, key, ref)
    if not is_hub_id(name):
        p = Path(name).expanduser()
        if not p.is_dir():
            raise StageError(f"{ref.field}.name: model directory not found: {p}")
        if not (p / "config.json").is_file():
            raise StageError(f"{ref.field}.name: {p} has no config.json (expected a model in the hub layout)")
        problems = snapshot_problems(p)
        if problems:
            raise StageError(f"{ref.field}.name: snapshot {p} is incomplete: {'; '.join(problems[:5])}")
        _check_marker(p, ref)
        return p
    if not ref.revision:
        raise StageError(f"{ref.field}.revision: {name} is a hub id; pin a commit (e.g. --set "
                         f"{ref.field}.revision=<40-hex commit>) so every pod loads the same weights")
    looked: list[str] = []
    if root:
        if is_s3(root):
            from lever.storage.backends import open_store

            store = open_store(root)
            if store.manifest(ref.key) is not None:
                return _from_store(root, ref.key, ref)
            looked.append(store.location(ref.key))
        else:
            d = Path(root).expanduser() / ref.key
            problems = snapshot_problems(d)
            if problems == []:
                return d
            if problems:
                raise StageError(f"{ref.field}.name: snapshot {d} is incomplete: {'; '.join(problems[:5])}; "
                                 "pull it again with `lever models pull --force`")
            looked.append(str(d))
    cached = _hf_cache(ref)
    if cached is not None:
        return cached
    looked.append("the Hugging Face cache ($HF_HOME)")
    raise StageError(f"{ref.field}.name: {name}@{ref.revision} is not provisioned (looked in "
                     f"{' and '.join(looked)}); run `lever models pull --plan PLAN --profile PROFILE` "
                     f"(docs/kubernetes.md)")


# ----------------------------------------------------------------------------- pulling


def plan_models(plan: Any) -> list[ModelRef]:
    """The pretrained models a plan loads (tiny kinds are built from config: nothing to pull)."""
    refs = []
    if plan.lvlm.kind == "qwen2_5_vl":
        refs.append(ModelRef("lvlm", plan.lvlm.name, plan.lvlm.revision))
    if plan.encoder.kind == "clip":
        refs.append(ModelRef("encoder", plan.encoder.name, plan.encoder.revision))
    return refs


def _matches(rel: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(Path(rel).name, p) for p in ALLOW_PATTERNS) and not rel.startswith(".")


def _copy_tree(src: Path, dst: Path) -> int:
    n = 0
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and _matches(rel) and Path(rel).name not in ("_manifest.json", MARKER):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)
            n += 1
    return n


def _download(ref: ModelRef, dst: Path) -> None:
    """Hub snapshot of ``ref`` at its pinned revision into ``dst``."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ref.name, revision=ref.revision, local_dir=str(dst), cache_dir=str(hf_cache_dir()),
                          allow_patterns=list(ALLOW_PATTERNS))
    except Exception as exc:
        raise StageError(f"{ref.field}.name: cannot download {ref.name}@{ref.revision}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    shutil.rmtree(dst / ".cache", ignore_errors=True)  # huggingface_hub's local-dir bookkeeping


def pull(ref: ModelRef, dest: str, *, source: Optional[str] = None, force: bool = False,
         echo: Callable[[str], None] = print) -> str:
    """Snapshot ``ref`` into the models root ``dest`` (directory or s3://); returns its location.

    The files come from ``source`` when given (a local directory in the hub layout or an s3://
    snapshot: an operator's existing copy), else from the hub (network; offline, the Hugging Face
    cache).  A hub id lands under ``<org>--<name>/<revision>``, where the stages look; a
    local-directory name lands under its directory name and ``revision`` (or ``local``).
    Already-committed intact snapshots are skipped unless ``force``."""
    from lever.storage.backends import open_store

    store = open_store(dest)
    if is_hub_id(ref.name):
        if not ref.revision:
            raise StageError(f"{ref.field}.revision: pin a commit of {ref.name} before pulling it")
        key = ref.key
    elif is_s3(ref.name):
        raise StageError(f"{ref.field}.name: {ref.name} is already a snapshot in a store")
    else:
        key = snapshot_key(Path(ref.name).expanduser().resolve().name, ref.revision or "local")
        source = source or ref.name
    src_dir = resolve(ModelRef(ref.field, source, None), None) if source else None
    existing = None if force else store.check(key)
    if existing == []:
        echo(f"{ref.field}: {ref.name} already provisioned at {store.location(key)}")
        return store.location(key)
    store.discard_staging(key)
    with store.staging(key) as st:
        if src_dir is not None:
            if not _copy_tree(src_dir, st.path):
                raise StageError(f"{ref.field}: nothing to copy from {src_dir}")
            origin = str(source)
        else:
            _download(ref, st.path)
            origin = f"hub:{ref.name}"
        atomic_write_json(st.path / MARKER, {"name": ref.name, "revision": ref.revision, "source": origin}, indent=2)
        if store.manifest(key) is not None:
            store.quarantine(key, "replaced by `lever models pull`")
        store.commit(key, {"kind": "model", "name": ref.name, "revision": ref.revision})
    echo(f"{ref.field}: {ref.name} -> {store.location(key)}")
    return store.location(key)
