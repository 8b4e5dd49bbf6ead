"""train-v2: CE on InfoScore-style beams learns the best beam; the beam reader validates input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from lever.config.schema import SelectorConfig, V2TrainConfig
from lever.errors import StageError
from lever.rl.groups import build_groups
from rl_synthetic import make_beam_records, synthetic_embeddings, write_jsonl
from lever.rl.trainer import EpochRecorder
from lever.rl.validation import split_records
from lever.selectors.pointer import build_selector
from lever.training.v2 import evaluate_v2, read_beams, run_v2


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_v2_learns_the_best_beam_far_above_chance(tmp_path):
    emb, u = synthetic_embeddings(160, 16, 0)
    write_jsonl(tmp_path / "beams.jsonl",
                       make_beam_records(emb, u, query_ids=list(range(120)), pool_size=12, beam_size=3, seed=0))
    recs, counts = read_beams([tmp_path])
    assert counts == {"queries": 120, "beams_kept": 360, "beams_dropped": 0}
    tr, va = split_records(recs, 0.25)
    train = build_groups(tr, n_items=160, reward_field="score")
    val = build_groups(va, n_items=160, reward_field="score")
    m = build_selector(16, SelectorConfig(hidden=32, dropout=0.1), seed=0)
    before = evaluate_v2(m, emb, val)
    rows = run_v2(m, emb, train, val, V2TrainConfig(epochs=15, lr=3e-3, batch_size=16),
                  recorder=EpochRecorder(tmp_path / "out", console=Console(file=io.StringIO())))
    after = evaluate_v2(m, emb, val)
    chance = 1 / (12 * 11)  # one ordered pair of a pool of 12
    assert after["val_top1"] >= 0.15 > 10 * chance and after["val_top1"] > before["val_top1"]
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert len(rows) == 15


def test_score_threshold_drops_beams(tmp_path):
    emb, u = synthetic_embeddings(40, 8, 0)
    recs = make_beam_records(emb, u, query_ids=[0, 1, 2], pool_size=6, beam_size=3)
    write_jsonl(tmp_path / "beams.jsonl", recs)
    cut = sorted(b["score"] for r in recs for b in r["beams"])[4]
    out, counts = read_beams([tmp_path / "beams.jsonl"], score_threshold=cut)
    assert counts["beams_dropped"] == 4 and counts["beams_kept"] == 5
    assert all(c["score"] >= cut for r in out for c in r["candidates"])


def test_bad_beam_line_names_file_line_field_and_query(tmp_path):
    emb, u = synthetic_embeddings(40, 8, 0)
    recs = make_beam_records(emb, u, query_ids=[4, 6], pool_size=6, beam_size=2)
    recs[1]["beams"][1]["score"] = float("nan")
    p = tmp_path / "beams.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(StageError, match=r"beams.jsonl: line 2, query_id 6: field 'beams\[1\].score'"):
        read_beams([p])
