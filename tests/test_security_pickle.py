"""Nothing read from disk or the store is unpickled.

A crafted pickle whose loading would run code (write a marker file) is offered to every way Lever
could read a checkpoint -- the loader, ``lever validate``, and a stage reading it from the store --
and the marker must never appear.  A control shows that the file really is armed (plain
``torch.load(weights_only=False)`` does create the marker), so the test can fail.  A static scan
keeps unsafe loaders out of the package source.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from lever.cli import main
from lever.config import load_plan
from lever.errors import StageError
from lever.pipeline.runner import Pipeline
from lever.storage.store import LocalStore
from rl_synthetic import synthetic_embeddings, write_embeddings_dir
from lever.selectors.checkpoint import load_checkpoint, save_checkpoint
from lever.selectors.pointer import build_selector
from reliability_store import jsonl, load_corpus_module, seed, tree_hash

PKG = Path(__file__).resolve().parents[1] / "lever"


class _Armed:
    """Unpickling this calls exec(), which writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def make_evil(path: Path, marker: Path) -> Path:
    """A torch-format file holding a real-looking state dict plus the armed object."""
    torch.save({"query_proj.weight": torch.zeros(2, 2), "_": _Armed(marker)}, path)
    return path


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_control_the_crafted_file_is_armed(tmp_path):
    marker = tmp_path / "control-marker"
    evil = make_evil(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)  # what Lever must never do
    assert marker.read_text() == "pwned"


def test_weights_only_refuses_it(tmp_path):
    marker = tmp_path / "marker"
    evil = make_evil(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("as_name", ["evil.pt", "model.safetensors"])
def test_loader_and_validate_refuse_a_pickle_checkpoint(tmp_path, as_name, capsys):
    marker = tmp_path / "marker"
    evil = make_evil(tmp_path / as_name, marker)
    if as_name.endswith(".safetensors"):  # pickle bytes under the safetensors name, with a valid meta
        save_checkpoint(tmp_path / "ok", build_selector(4, load_plan("baseline", "tiny").selector, seed=0))
        (tmp_path / "model.json").write_bytes((tmp_path / "ok.json").read_bytes())
    with pytest.raises(StageError):
        load_checkpoint(evil)
    assert _cli(["validate", "checkpoint", str(evil)]) == 2
    assert "refused" in capsys.readouterr().out or as_name.endswith(".safetensors")
    assert not marker.exists()


def test_stage_reading_a_pickle_from_the_store_refuses_it(tmp_path):
    marker = tmp_path / "marker"
    plan = load_plan("baseline", "tiny", ["rl_data.shards=1", "rce.epochs=1"])
    store = LocalStore(tmp_path / "store")
    pipe = Pipeline(plan, store)
    emb, _ = synthetic_embeddings(64, 8, 0)
    edir = write_embeddings_dir(tmp_path / "emb", emb)
    seed(pipe, "export-embeddings", {p.name: p for p in edir.iterdir()})
    save_checkpoint(tmp_path / "v2" / "model", build_selector(8, plan.selector, seed=0))
    evil = make_evil(tmp_path / "evil.bin", marker)
    seed(pipe, "train-v2", {"model.json": tmp_path / "v2" / "model.json", "model.safetensors": evil})
    seed(pipe, "generate-rl-data", {"rl_data.jsonl": jsonl(load_corpus_module()._rl_base())})
    before = tree_hash(store.root)
    with pytest.raises(StageError) as err:
        pipe.run_unit("train-rce", pipe.select_units("train-rce")[0])
    assert "safetensors" in str(err.value)
    assert not marker.exists()
    assert tree_hash(store.root) == before


# -- static scan -----------------------------------------------------------------------------------

def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def unsafe_loads(root: Path) -> list[str]:
    """Every call in ``root`` that can unpickle: pickle/dill/joblib loads, torch.load without
    ``weights_only=True``, numpy.load with ``allow_pickle=True``, yaml.load/unsafe_load."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal") for n in names):
                    found.append(f"{path}:{node.lineno}: imports a pickle-family module")
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{path}:{node.lineno}: {name}"
            if name.endswith("torch.load"):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    found.append(where + " with allow_pickle=True")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(where)
    return found


def test_package_source_has_no_unsafe_loader():
    assert unsafe_loads(PKG) == []


def test_scan_catches_what_it_should(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import pickle\nimport torch, numpy as np, yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "yaml.load('a')\ntorch.load('x', weights_only=True)\n")
    hits = unsafe_loads(tmp_path)
    assert len(hits) == 5, hits
    assert json.dumps(hits)
