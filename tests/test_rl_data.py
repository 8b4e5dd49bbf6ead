"""RL data reader: every bad record is reported with file, line, field and query id."""

from __future__ import annotations

import copy
import json
import math

import pytest

from lever.errors import StageError
from lever.rl.data import read_rl_data, rl_data_stats
from rl_synthetic import make_rl_records, synthetic_embeddings, write_jsonl


@pytest.fixture()
def records():
    emb, u = synthetic_embeddings(40, 8, 0)
    return make_rl_records(emb, u, query_ids=[3, 5, 7, 9], pool_size=6, group_sizes=(3, 5), seed=0)


def _write(tmp_path, recs, name="rl_data.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_valid_shards_read_in_order(tmp_path, records):
    a = write_jsonl(tmp_path / "s0" / "rl_data.jsonl", records[:2])
    b = write_jsonl(tmp_path / "s1" / "rl_data.jsonl", records[2:])
    out = read_rl_data([a.parent, b])  # a directory or a file
    assert [r["query_id"] for r in out] == [3, 5, 7, 9]
    assert all(r["n_eval_failed"] == 0 for r in out)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r["candidates"][1].__setitem__("acc_score", math.nan), "candidates[1].acc_score"),
        (lambda r: r["candidates"][0].__setitem__("gt_prob", "high"), "candidates[0].gt_prob"),
        (lambda r: r["candidates"][0].__setitem__("correct", 1), "candidates[0].correct"),
        (lambda r: r["candidates"][0].pop("rel_score"), "candidates[0].rel_score"),
        (lambda r: r["candidates"][2].__setitem__("icd_ids", [r["pool"][0], r["pool"][0]]) or
         r["candidates"][2].__setitem__("positions", [0, 0]), "candidates[2].icd_ids"),
        (lambda r: r["candidates"][0].__setitem__("icd_ids", [999, r["candidates"][0]["icd_ids"][1]]),
         "candidates[0].icd_ids"),
        (lambda r: r["candidates"][0].__setitem__("positions", [17, 0]), "candidates[0].positions"),
        (lambda r: r["candidates"][0].__setitem__("source", "beam"), "candidates[0].source"),
        (lambda r: r.__setitem__("candidates", []), "candidates"),
        (lambda r: r.__setitem__("pool", [1, 1, 2]), "pool"),
        (lambda r: r.__setitem__("image_id", "x"), "image_id"),
    ],
)
def test_bad_field_is_named_with_file_line_and_query_id(tmp_path, records, mutate, field):
    recs = copy.deepcopy(records)
    mutate(recs[2])
    p = _write(tmp_path, recs)
    with pytest.raises(StageError) as e:
        read_rl_data([p])
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "query_id 7" in msg and repr(field) in msg


def test_nan_written_as_json_nan_reports_query_id(tmp_path, records):
    recs = copy.deepcopy(records)
    recs[1]["candidates"][0]["acc_score"] = float("nan")
    p = tmp_path / "rl.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))  # json.dumps writes NaN
    with pytest.raises(StageError, match=r"line 2, query_id 5: field 'candidates\[0\].acc_score': not finite"):
        read_rl_data([p])


def test_duplicate_query_id_across_shards(tmp_path, records):
    a = _write(tmp_path, records[:2], "a.jsonl")
    b = _write(tmp_path, records[1:], "b.jsonl")
    with pytest.raises(StageError, match=r"b.jsonl: line 1, query_id 5: field 'query_id': duplicate query id \(first at .*a.jsonl: line 2\)"):
        read_rl_data([a, b])


def test_eval_failed_candidates_are_excluded_and_counted(tmp_path, records):
    recs = copy.deepcopy(records)
    n = len(recs[0]["candidates"])
    recs[0]["candidates"][1].update({"eval_failed": True, "acc_score": None, "gt_prob": None})
    out = read_rl_data([_write(tmp_path, recs)])
    assert len(out[0]["candidates"]) == n - 1 and out[0]["n_eval_failed"] == 1
    assert rl_data_stats(out)["eval_failed"] == 1


def test_invalid_json_line(tmp_path, records):
    p = tmp_path / "rl.jsonl"
    p.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(StageError, match="line 2: invalid JSON"):
        read_rl_data([p])


def test_mixed_sequence_lengths_rejected(tmp_path, records):
    recs = copy.deepcopy(records)
    c = recs[3]["candidates"][0]
    c["positions"] = c["positions"][:1]
    c["icd_ids"] = c["icd_ids"][:1]
    with pytest.raises(StageError, match="query_id 9: field 'candidates\\[0\\].icd_ids': sequence of length 1"):
        read_rl_data([_write(tmp_path, recs)])


def test_every_problem_is_listed_in_one_error(tmp_path, records):
    from lever.rl.data import check_rl_data

    recs = copy.deepcopy(records)
    recs[0]["candidates"][0]["acc_score"] = "x"
    recs[0]["candidates"][2]["source"] = "beam_search"
    recs[3]["image_id"] = None
    p = _write(tmp_path, recs)
    good, problems = check_rl_data([p])
    assert [r["query_id"] for r in good] == [5, 7]
    assert len(problems) == 3
    assert "line 1, query_id 3: field 'candidates[0].acc_score'" in problems[0]
    assert "line 1, query_id 3: field 'candidates[2].source'" in problems[1]
    assert "line 4, query_id 9: field 'image_id'" in problems[2]
    with pytest.raises(StageError) as e:
        read_rl_data([p])
    assert all(x in str(e.value) for x in problems) and "(3 problems)" in str(e.value)


def test_newer_schema_asks_for_an_upgrade(tmp_path, records):
    recs = copy.deepcopy(records)
    recs[0]["schema_version"] = 2
    with pytest.raises(StageError, match=r"line 1, query_id 3: field 'schema_version': 2 was written by a newer Lever .* upgrade lever"):
        read_rl_data([_write(tmp_path, recs)])
