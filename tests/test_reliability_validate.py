"""The bad-input corpus (tests/data/bad/): each file is rejected by ``lever validate`` (exit 2,
file/line/field printed) AND by the stage that would read it (StageError / exit 2), and the store
is byte-for-byte unchanged afterwards.  Valid inputs pass both ways (so each test can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lever.cli import main
from lever.config import load_plan
from lever.errors import StageError
from lever.pipeline.runner import Pipeline
from lever.storage.store import LocalStore
from rl_synthetic import synthetic_embeddings, write_embeddings_dir
from lever.selectors.checkpoint import save_checkpoint
from lever.selectors.pointer import build_selector
from reliability_store import jsonl, load_corpus_module, seed, tree_hash

BAD = Path(__file__).resolve().parent / "data" / "bad"
corpus = load_corpus_module()

#: corpus file -> fragments every rejection message must contain (the field, or the cause)
EXPECTED: dict[str, list[str]] = {
    "rl-data/truncated.jsonl": ["line 2", "invalid JSON"],
    "rl-data/wrong_types.jsonl": ["line 2", "'image_id'", "'candidates[0].acc_score'"],
    "rl-data/missing_fields.jsonl": ["line 1", "'question'", "line 2", "'candidates[2].correct'"],
    "rl-data/nan_reward.jsonl": ["line 1", "'candidates[1].acc_score'", "line 2", "'candidates[0].gt_prob'"],
    "rl-data/empty_group.jsonl": ["line 2", "'candidates'"],
    "rl-data/duplicate_query.jsonl": ["line 3", "'query_id'", "duplicate"],
    "rl-data/pool_smaller_than_shots.jsonl": ["line 2", "'pool'", "smaller than"],
    "rl-data/newer_schema.jsonl": ["line 1", "'schema_version'", "newer Lever", "upgrade lever"],
    "plan/typo.yaml": ["line 5", "'grpo.kl_betta'", "did you mean 'kl_beta'"],
    "plan/unknown_reward_mode.yaml": ["line 4", "'reward.mode'"],
    "plan/pool_smaller_than_shots.yaml": ["line 4", "'sampler.pool_size'", "smaller than"],
    "plan/retrieved_pool_under_shots.yaml": ["line 5", "'infer.retrieve_top_n'", "4 shots"],
    "plan/wrong_type.yaml": ["line 4", "'rce.epochs'"],
    "plan/truncated.yaml": ["line 3", "invalid YAML"],
    "predictions/truncated.jsonl": ["line 3", "invalid JSON"],
    "predictions/wrong_types.jsonl": ["line 1", "'shot'", "line 3", "'accuracy'"],
    "predictions/missing_fields.jsonl": ["line 2", "'accuracy'", "missing"],
    "predictions/nan_accuracy.jsonl": ["line 2", "NaN"],
    "predictions/fewer_icds_than_shot.jsonl": ["line 1", "'icd_ids'", "shot 4"],
    "predictions/duplicate_question.jsonl": ["line 4", "'question_id'", "twice"],
    "checkpoint/other_shape.json": ["other_shape.safetensors", "'query_proj.weight'", "(8, 4)", "(16, 4)"],
    "checkpoint/newer_schema.json": ["newer_schema.json", "'schema_version'", "newer Lever", "upgrade lever"],
}


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_every_corpus_file_is_listed():
    on_disk = {p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file()
               and p.suffix in (".jsonl", ".yaml", ".json")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lever_validate_rejects_with_file_line_field(name, capsys):
    kind = name.split("/")[0]
    rc = cli(["validate", kind, str(BAD / name)])
    out = capsys.readouterr()
    assert rc == 2, out
    text = out.out
    assert Path(name).stem in text  # the file is named on the problem lines
    for frag in EXPECTED[name]:
        assert frag in text, f"{frag!r} not in:\n{text}"


# -- valid inputs pass (the validators are not just always-failing) -------------------------------

def _good_rl() -> list[dict]:
    return corpus._rl_base()


def test_valid_inputs_pass(tmp_path, capsys):
    rl = tmp_path / "rl_data.jsonl"
    rl.write_text(jsonl(_good_rl()))
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(jsonl(corpus._pred_base()))
    model = build_selector(4, load_plan("baseline", "tiny").selector, seed=0)
    save_checkpoint(tmp_path / "ck", model)
    assert cli(["validate", "rl-data", str(rl)]) == 0
    assert cli(["validate", "predictions", str(pred)]) == 0
    assert cli(["validate", "checkpoint", str(tmp_path / "ck.safetensors")]) == 0
    assert cli(["validate", "checkpoint", str(tmp_path / "ck"), "--plan", "baseline", "-p", "tiny"]) == 0
    assert cli(["validate", "plan", str(Path("lever/config/presets/plan5_8.yaml").resolve())]) == 0
    # and the --plan comparison can fail: a hidden=32 checkpoint is not a default (hidden 256) selector
    assert cli(["validate", "checkpoint", str(tmp_path / "ck"), "--plan", "baseline"]) == 2
    assert "arch.hidden" in capsys.readouterr().out


def test_the_installed_command_exits_2_and_0(tmp_path):
    """The real entry point (a subprocess), not only the in-process call."""
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "lever", "validate", "rl-data", str(BAD / "rl-data/nan_reward.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "candidates[1].acc_score" in bad.stdout
    (tmp_path / "ok").mkdir()
    save_checkpoint(tmp_path / "ok" / "model", build_selector(4, load_plan("baseline", "tiny").selector, seed=0))
    save_checkpoint(tmp_path / "ok" / "rce_epoch1", build_selector(4, load_plan("baseline", "tiny").selector, seed=1))
    good = subprocess.run([sys.executable, "-m", "lever", "validate", "checkpoint", str(tmp_path / "ok")],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr


def test_every_problem_is_collected_not_just_the_first(tmp_path, capsys):
    recs = _good_rl()
    recs[0]["candidates"][0]["acc_score"] = "x"
    recs[0]["candidates"][2]["source"] = "beam_search"
    recs[1]["image_id"] = None
    p = tmp_path / "many.jsonl"
    p.write_text(jsonl(recs))
    assert cli(["validate", "rl-data", str(p)]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3, lines
    assert "candidates[0].acc_score" in lines[0] and "candidates[2].source" in lines[1] and "image_id" in lines[2]


def test_eval_failed_candidates_are_kept_marked_excluded_and_counted(tmp_path):
    from lever.rl.data import read_rl_data, rl_data_stats

    recs = _good_rl()
    c = recs[0]["candidates"][1]
    c.update({"eval_failed": True, "acc_score": None, "correct": None, "error": "CUDA OOM"})
    p = tmp_path / "rl.jsonl"
    p.write_text(jsonl(recs))
    assert cli(["validate", "rl-data", str(p)]) == 0
    out = read_rl_data([p])
    assert len(out[0]["candidates"]) == 2 and out[0]["n_eval_failed"] == 1  # excluded from the group
    assert rl_data_stats(out)["eval_failed"] == 1
    assert json.loads(p.read_text().splitlines()[0])["candidates"][1]["eval_failed"] is True  # kept on disk


# -- the stages refuse the same files and leave the store untouched -----------------------------

EMB_ITEMS, EMB_DIM = 64, 8


@pytest.fixture()
def training_store(tmp_path):
    """A local store holding embeddings and a v2 model under the keys plan ``baseline`` (tiny,
    one RL shard) reads; returns (pipeline, store root)."""
    plan = load_plan("baseline", "tiny", ["rl_data.shards=1", "rce.epochs=1"])
    store = LocalStore(tmp_path / "store")
    pipe = Pipeline(plan, store)
    emb, _ = synthetic_embeddings(EMB_ITEMS, EMB_DIM, 0)
    edir = write_embeddings_dir(tmp_path / "emb", emb)
    seed(pipe, "export-embeddings", {p.name: p for p in edir.iterdir()})
    save_checkpoint(tmp_path / "v2" / "model", build_selector(EMB_DIM, plan.selector, seed=0), phase="v2")
    seed(pipe, "train-v2", {p.name: p for p in (tmp_path / "v2").iterdir()})
    return pipe, store.root


def _run_rce(pipe: Pipeline):
    return pipe.run_unit("train-rce", pipe.select_units("train-rce")[0])


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("rl-data/")))
def test_train_rce_refuses_bad_rl_data_and_changes_nothing(training_store, name):
    pipe, root = training_store
    seed(pipe, "generate-rl-data", {"rl_data.jsonl": BAD / name})
    before = tree_hash(root)
    with pytest.raises(StageError) as err:
        _run_rce(pipe)
    for frag in EXPECTED[name]:
        assert frag in str(err.value)
    assert tree_hash(root) == before
    assert pipe.status("train-rce", pipe.select_units("train-rce")[0]) == "missing"


def test_train_rce_accepts_the_valid_file(training_store):
    pipe, root = training_store
    seed(pipe, "generate-rl-data", {"rl_data.jsonl": jsonl(_good_rl())})
    r = _run_rce(pipe)
    assert r.status == "built" and (root / r.key / "rce_epoch1.safetensors").exists()


@pytest.mark.parametrize("name", ["checkpoint/other_shape.json", "checkpoint/newer_schema.json"])
def test_train_rce_refuses_a_bad_v2_checkpoint(tmp_path, name):
    plan = load_plan("baseline", "tiny", ["rl_data.shards=1", "rce.epochs=1", "selector.hidden=16"])
    store = LocalStore(tmp_path / "store")
    pipe = Pipeline(plan, store)
    emb, _ = synthetic_embeddings(EMB_ITEMS, 4, 0)
    edir = write_embeddings_dir(tmp_path / "emb", emb)
    seed(pipe, "export-embeddings", {p.name: p for p in edir.iterdir()})
    stem = (BAD / name).with_suffix("")
    seed(pipe, "train-v2", {"model.json": stem.with_suffix(".json"), "model.safetensors": stem.with_suffix(".safetensors")})
    seed(pipe, "generate-rl-data", {"rl_data.jsonl": jsonl(_good_rl())})
    before = tree_hash(store.root)
    with pytest.raises(StageError) as err:
        _run_rce(pipe)
    for frag in EXPECTED[name][1:]:
        assert frag in str(err.value)
    assert tree_hash(store.root) == before


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("plan/")))
def test_lever_run_refuses_bad_plan_and_changes_nothing(tmp_path, name, capsys):
    root = tmp_path / "store"
    LocalStore(root).put_json("plans/x/latest.json", {"keep": True})
    before = tree_hash(root)
    # no profile: the tiny profile sets sampler.pool_size itself, which would mask that plan's error
    assert cli(["run", str(BAD / name), "--store", str(root)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and Path(name).name in err
    assert tree_hash(root) == before


SUMMARY_SETS = ["infer.shots=[2]", "infer.baselines=[]", "infer.shards=1", "baseline_plan=null", "rl_data.shards=1"]


def _report_store(tmp_path, predictions: str, rl_records: list[dict] | None = None):
    plan = load_plan("baseline", "tiny", SUMMARY_SETS)
    store = LocalStore(tmp_path / "store")
    pipe = Pipeline(plan, store)
    seed(pipe, "generate-rl-data", {"rl_data.jsonl": jsonl(rl_records if rl_records is not None else _good_rl())})
    seed(pipe, "train-rce", {"metrics.jsonl": ""})
    seed(pipe, "train-grpo", {"metrics.jsonl": ""})
    seed(pipe, "select-checkpoint", {"selected.json": json.dumps({"checkpoint": "model", "reason": "test"})})
    seed(pipe, "infer", {"predictions.jsonl": predictions, "summary.json": json.dumps({"accuracy": 0.5, "n": 3})})
    return pipe, store.root


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("predictions/")))
def test_summarize_refuses_bad_predictions_and_changes_nothing(tmp_path, name):
    pipe, root = _report_store(tmp_path, (BAD / name).read_text())
    before = tree_hash(root)
    with pytest.raises(StageError) as err:
        pipe.run_unit("summarize", pipe.select_units("summarize")[0])
    for frag in EXPECTED[name]:
        assert frag in str(err.value)
    assert tree_hash(root) == before


def test_summarize_counts_failed_evaluations(tmp_path):
    rows = corpus._pred_base()
    rows.append({"question_id": 2099, "variant": "selector", "shot": 2, "eval_failed": True,
                 "error": "generation timed out"})
    recs = _good_rl()
    recs[1]["candidates"][0]["eval_failed"] = True
    pipe, root = _report_store(tmp_path, jsonl(rows), recs)
    r = pipe.run_unit("summarize", pipe.select_units("summarize")[0])
    rep = json.loads((root / r.key / "report.json").read_text())
    assert rep["schema_version"] == 1
    assert rep["n"]["plan"]["2"] == 3  # the failed row is not in the mean
    assert rep["failed_evaluations"]["predictions"]["plan"] == 1
    assert rep["failed_evaluations"]["rl_data"] == 1


def test_bad_corpus_generator_is_deterministic(tmp_path):
    make_corpus = corpus
    for sub, files in (("rl-data", make_corpus.rl_corpus()), ("plan", make_corpus.PLANS),
                       ("predictions", make_corpus.predictions_corpus())):
        for fname, text in files.items():
            assert (BAD / sub / fname).read_text() == text, f"{sub}/{fname} is stale: rerun make_corpus.py"
