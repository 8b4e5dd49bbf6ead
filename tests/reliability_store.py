"""Helpers for the reliability tests: seed a store with hand-made upstream artifacts, hash trees.

Why seed instead of running the pipeline: a test of "the stage refuses this input and changes
nothing" must put exactly that input under the key the stage reads, in milliseconds.  Seeding
goes through the store's own staging + commit, so the artifacts are as real as a run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Optional, Union

from lever.pipeline.graph import Unit
from lever.pipeline.runner import Pipeline

Content = Union[bytes, str, Path]


def tree_hash(root: Path, skip: tuple[str, ...] = (".locks", ".staging")) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (lock files and empty staging dirs
    are bookkeeping, not artifacts)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            continue
        if p.is_file():
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _bytes(c: Content) -> bytes:
    if isinstance(c, Path):
        return c.read_bytes()
    return c.encode("utf-8") if isinstance(c, str) else c


def seed(pipe: Pipeline, stage: str, files: Mapping[str, Content], unit: Optional[Unit] = None) -> list[str]:
    """Commit ``files`` (relative name -> content) as every unit (or one unit) of ``stage``."""
    keys = []
    for u in [unit] if unit is not None else pipe.select_units(stage):
        key = pipe.key(stage, u)
        with pipe.store.staging(key) as st:
            for rel, content in files.items():
                dest = st.path / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(_bytes(content))
            pipe.store.commit(key, {"stage": stage, "unit": u.id, "seeded_by": "test"})
        keys.append(key)
    return keys


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def load_corpus_module():
    """``tests/data/bad/make_corpus.py`` as a module (tests/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "data" / "bad" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("lever_bad_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod
