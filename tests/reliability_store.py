"""Helpers for the reliability tests: seed a store with hand-made upstream artifacts, hash trees.

Why seed instead of running the pipeline: a test of "the stage refuses this input and changes
nothing" must put exactly that input under the key the stage reads, in milliseconds.  Seeding
goes through the store's own staging + commit, so the artifacts are as real as a run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Union

from lever.context import Unit

if TYPE_CHECKING:  # imported lazily: the fake-graph driver below must patch the graph first
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


def seed(pipe: "Pipeline", stage: str, files: Mapping[str, Content], unit: Optional[Unit] = None) -> list[str]:
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


# -- `lever run` with fake stage functions, for kill tests in a subprocess ---------------------------

def _entry(ctx) -> None:
    """Record one stage entry ("stage unit-hash run-id") in ``$LEVER_TEST_ENTRY_LOG`` -- shared by
    every process of a test, so it counts across runs and worker processes how often each unit
    was computed -- then wait ``$LEVER_TEST_STAGE_DELAY_S`` (compute time, so runs overlap):
    seconds, or ``stage=seconds`` pairs with ``*`` for the others (``infer=0.3,*=0.05``)."""
    import os
    import time

    path = os.environ.get("LEVER_TEST_ENTRY_LOG")
    if path:
        line = f"{ctx.stage} {ctx.config_hash} {ctx.run_id}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write: lines of concurrent processes never interleave
        finally:
            os.close(fd)
    spec = os.environ.get("LEVER_TEST_STAGE_DELAY_S", "") or "0"
    delays = dict(p.split("=", 1) if "=" in p else ("*", p) for p in spec.split(","))
    delay = float(delays.get(ctx.stage, delays.get("*", 0)))
    if delay:
        time.sleep(delay)


def hang_or_run(ctx) -> None:
    """The fake stage of ``ctx.stage`` (tests/test_runner_fakes.py); when ``$LEVER_TEST_HANG``
    names this unit ("stage:unit-id") and ``$LEVER_TEST_HANG_FLAG`` does not exist yet, it then
    creates the flag and blocks, uncommitted, so the test can SIGKILL the run at that point --
    or, with ``$LEVER_TEST_HANG_UNTIL`` set, until that file exists (then it returns normally)."""
    import os
    import time

    import test_runner_fakes as fakes

    _entry(ctx)
    getattr(fakes, fakes.FUNCS.get(ctx.stage, "generic"))(ctx)
    spec, flag = os.environ.get("LEVER_TEST_HANG", ""), os.environ.get("LEVER_TEST_HANG_FLAG", "")
    if spec and flag and spec == f"{ctx.stage}:{ctx.unit.id}" and not Path(flag).exists():
        Path(flag + ".tmp").write_text(f"{os.getpid()} {ctx.stage}/{ctx.config_hash}")  # pid and the unit's key
        os.replace(flag + ".tmp", flag)  # whole or absent: the test reads it as soon as it exists
        until = os.environ.get("LEVER_TEST_HANG_UNTIL", "")
        deadline = time.monotonic() + 120  # bounded: the test kills or releases us long before
        while time.monotonic() < deadline and not (until and Path(until).exists()):
            time.sleep(0.05)


def summarize(ctx) -> None:
    """The real summarizer, with its entry recorded like the fakes'."""
    from lever.stages.summarize import summarize as real  # the graph's func (graph.BY_NAME may be this fake's)

    _entry(ctx)
    real(ctx)


def fake_graph():
    import dataclasses

    from lever.pipeline.graph import STAGES

    return tuple(dataclasses.replace(st, func="reliability_store:" + ("summarize" if st.name == "summarize" else "hang_or_run"))
                 for st in STAGES)


def main(argv: list[str]) -> None:
    """``python tests/reliability_store.py run PLAN ...``: the real ``lever`` CLI on the fake graph."""
    import lever.pipeline.graph as graph

    graph.STAGES = fake_graph()
    graph.BY_NAME = {s.name: s for s in graph.STAGES}
    from lever.cli import main as lever_main  # imports the runner after the patch: it binds STAGES

    lever_main(argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
