"""Checkpoints: safetensors + JSON only, exact round trips, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lever.config.schema import SelectorConfig
from lever.errors import StageError
from lever.selectors.checkpoint import from_v2_state, load_checkpoint, save_checkpoint, to_v2_state
from lever.selectors.pointer import build_selector, sequence_logprob


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on the shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(hidden: int = 16, layers: int = 2):
    return build_selector(8, SelectorConfig(hidden=hidden, layers=layers, heads=2, dropout=0.2), seed=3)


def _lp(m):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(4, 8, generator=g), torch.randn(4, 7, 8, generator=g)
    return sequence_logprob(m.eval(), q, c, torch.tensor([[0, 1, 2], [6, 5, 4], [3, 0, 6], [2, 4, 1]]))


@pytest.mark.parametrize("layout", ["v3", "v2"])
def test_round_trip_gives_identical_logprobs(tmp_path, layout):
    m = _model()
    save_checkpoint(tmp_path / "ck", m, plan="p", epoch=3, phase="rce", metrics={"val_loss": 1.5}, layout=layout)
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert torch.equal(_lp(m), _lp(m2))
    assert meta["epoch"] == 3 and meta["phase"] == "rce" and meta["layout"] == layout
    assert meta["arch"]["embed_dim"] == 8 and meta["arch"]["hidden"] == 16
    # either suffix works as the path
    m3, _ = load_checkpoint(tmp_path / "ck.safetensors")
    assert torch.equal(_lp(m), _lp(m3))


def test_v2_layout_is_a_bijection_with_the_documented_names():
    sd = _model().state_dict()
    v2 = to_v2_state(sd)
    assert "pointer_selector.cross_attn.1.in_proj_weight" in v2
    assert "pointer_selector.pointer_head.key.weight" in v2
    assert "pointer_selector.state_update.norm.bias" in v2
    assert not any(k.startswith("pointer_selector.layers") for k in v2)
    back = from_v2_state(v2)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_shape_mismatch_is_refused_naming_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "ck", _model(hidden=16))
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["arch"]["hidden"] = 32
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(StageError, match=r"tensor '.*' has shape .* implies"):
        load_checkpoint(tmp_path / "ck")


def test_missing_tensor_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", _model())
    t = load_file(str(tmp_path / "ck.safetensors"))
    del t["score_c.weight"]
    save_file(t, str(tmp_path / "ck.safetensors"))
    with pytest.raises(StageError, match="score_c.weight"):
        load_checkpoint(tmp_path / "ck")


def test_a_pickle_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path / "ck", _model())
    torch.save(_model().state_dict(), tmp_path / "ck.safetensors")  # a pickle under the expected name
    with pytest.raises(StageError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_missing_meta_or_bad_kind(tmp_path):
    with pytest.raises(StageError, match="meta not found"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path / "ck", _model())
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["kind"] = "lever_lm"
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(StageError, match="field 'kind'"):
        load_checkpoint(tmp_path / "ck")
