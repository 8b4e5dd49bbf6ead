"""The report's numbers recomputed independently from the predictions/RL-data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lever.config import load_plan
from lever.pipeline.runner import Pipeline, load_baseline, run_plan
from lever.storage.store import LocalStore
from lever.report.bootstrap import paired_bootstrap
from lever.campaign.compare import compare_plans, render_markdown
from test_runner_fakes import fake_stages

SMALL = ["infer.num_samples=30", "infer.shards=2", "infer.shots=[1,2,3]", "report.bootstrap_samples=300"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store = LocalStore(root / "store")
    plan = load_plan("plan1", "tiny", SMALL)
    base = load_baseline(plan, "tiny", SMALL)
    summary = run_plan(plan, store, baseline=base, stages=fake_stages(), jobs=1)
    report_dir = Path(summary.report).parent
    return store, plan, base, report_dir


def _predictions(store, plan, variant, shot):
    pipe = Pipeline(plan, store, stages=fake_stages())
    rows = {}
    for u in pipe.select_units("infer", filters={"variant": variant, "shot": str(shot)}):
        for line in (store.open(pipe.key("infer", u)) / "predictions.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows[r["question_id"]] = r
    return rows


def test_accuracies_and_differences_match_predictions(built):
    store, plan, base, report_dir = built
    rep = json.loads((report_dir / "report.json").read_text())
    assert rep["shots"] == [1, 2, 3]
    avgs = []
    for shot in (1, 2, 3):
        p = _predictions(store, plan, "selector", shot)
        b = _predictions(store, base, "selector", shot)
        assert len(p) == len(b) == 30
        acc_p = 100 * sum(r["accuracy"] for r in p.values()) / len(p)
        acc_b = 100 * sum(r["accuracy"] for r in b.values()) / len(b)
        assert rep["accuracy"]["plan"][str(shot)] == pytest.approx(acc_p, abs=0.006)
        assert rep["accuracy"]["baseline"][str(shot)] == pytest.approx(acc_b, abs=0.006)
        for ref in ("random", "retrieval"):
            r = _predictions(store, plan, ref, shot)
            assert rep["accuracy"][ref][str(shot)] == pytest.approx(100 * sum(x["accuracy"] for x in r.values()) / len(r), abs=0.006)
        comp = rep["comparison"][shot - 1]
        assert comp["diff"] == pytest.approx(acc_p - acc_b, abs=0.011)
        qs = sorted(p)
        ci = paired_bootstrap([p[q]["accuracy"] for q in qs], [b[q]["accuracy"] for q in qs], samples=300,
                              seed=plan.infer.seed * 1000 + shot)
        assert comp["paired"]["low"] == pytest.approx(100 * ci.low, abs=1e-3)
        assert comp["paired"]["high"] == pytest.approx(100 * ci.high, abs=1e-3)
        assert comp["paired"]["low"] <= comp["paired"]["diff"] <= comp["paired"]["high"]
        same = sum(set(p[q]["icd_ids"]) == set(b[q]["icd_ids"]) for q in qs) / len(qs)
        assert rep["icd_overlap"][str(shot)]["identical_set_share"] == pytest.approx(same, abs=1e-4)
        avgs.append(acc_p)
    assert rep["average"]["plan"] == pytest.approx(sum(avgs) / 3, abs=0.01)
    assert rep["shots_improved"] == sum(1 for c in rep["comparison"] if c["diff"] > 0)


def test_other_sections(built):
    store, plan, base, report_dir = built
    rep = json.loads((report_dir / "report.json").read_text())
    assert rep["checkpoint"]["checkpoint"] == "grpo_epoch3" and rep["checkpoint"]["reason"]
    assert [e["epoch"] for e in rep["training"]["grpo"]] == [1, 2, 3]
    assert rep["training"]["grpo"][1]["kl"] == pytest.approx(0.02)
    rd = rep["reward_data"]
    # recompute from the RL data files: eval_failed candidates are excluded and counted
    pipe = Pipeline(plan, store, stages=fake_stages())
    cands = []
    for u in pipe.select_units("generate-rl-data"):
        for line in (store.open(pipe.key("generate-rl-data", u)) / "rl_data.jsonl").read_text().splitlines():
            cands += json.loads(line)["candidates"]
    ok = [c for c in cands if not c["eval_failed"]]
    assert rd["candidates"] == len(ok)
    assert rep["failed_evaluations"]["rl_data"] == len(cands) - len(ok)
    assert rd["correct_share"] == pytest.approx(sum(c["correct"] for c in ok) / len(ok), abs=1e-4)
    assert rd["zero_variance_groups"] >= 2  # query 0 of each shard is all-incorrect
    assert sum(rd["quality_buckets"].values()) == rd["queries"]
    for png in ("accuracy.png", "difference.png", "training.png", "rewards.png"):
        assert (report_dir / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    md = (report_dir / "report.md").read_text()
    for section in ("Accuracy per shot", "Chosen checkpoint", "Training curves", "ICD overlap", "RL data diagnostics",
                    "Failed LVLM evaluations", "paired bootstrap"):
        assert section in md


def test_partial_report_marks_missing_and_is_not_cached(built, tmp_path):
    store, plan, base, _ = built
    # a plan whose GRPO never ran: its selector inference and checkpoint are missing
    plan2 = load_plan("plan1", "tiny", SMALL + ["grpo.epochs=2"])
    pipe = Pipeline(plan2, store, stages=fake_stages(), baseline=base, run_id="r-partial")
    res = pipe.run_partial("summarize")
    assert res.status == "partial" and res.key == "partial/plan1/r-partial"
    rep = json.loads((store.open(res.key) / "report.json").read_text())
    assert rep["partial"] and any(m.startswith("infer/variantselector") for m in rep["missing"])
    assert rep["accuracy"]["plan"]["1"] is None and rep["accuracy"]["random"]["1"] is not None
    md = (store.open(res.key) / "report.md").read_text()
    assert "Partial report" in md
    assert pipe.status("summarize", pipe.select_units("summarize")[0]) == "missing"
    # the regression verdict is not available on a partial report (and writing it did not raise)
    assert rep["regression"]["available"] is False and rep["regression"]["detected"] is False
    assert "partial report" in rep["regression"]["reason"] and "verdict not available" in md
    # plan1 asks for GRPO epochs 1..3, this variant trains 2: epoch 3 is reported as not trained
    assert rep["epoch_checkpoints"]["evaluated"] == [1, 2] and rep["epoch_checkpoints"]["not_trained"] == [3]
    assert "epoch3" not in rep["accuracy"] and rep["accuracy"]["epoch1"]["1"] is None


def test_epoch_rows_match_their_predictions(built):
    """plan1 evaluates GRPO epochs 1, 2, 3 beside the chosen checkpoint: one row each."""
    store, plan, base, report_dir = built
    rep = json.loads((report_dir / "report.json").read_text())
    assert list(rep["accuracy"]) == ["plan", "baseline", "epoch1", "epoch2", "epoch3", "random", "retrieval", "oracle"]
    assert rep["epoch_checkpoints"] == {"requested": [1, 2, 3], "evaluated": [1, 2, 3], "not_trained": [],
                                        "stopped": {}, "grpo_epochs": 3, "rows": ["epoch1", "epoch2", "epoch3"]}
    for e in (1, 2, 3):
        accs = []
        for shot in (1, 2, 3):
            rows = _predictions(store, plan, f"epoch{e}", shot)
            assert len(rows) == 30 and {r["variant"] for r in rows.values()} == {f"epoch{e}"}
            acc = 100 * sum(r["accuracy"] for r in rows.values()) / len(rows)
            assert rep["accuracy"][f"epoch{e}"][str(shot)] == pytest.approx(acc, abs=0.006)
            assert rep["n"][f"epoch{e}"][str(shot)] == 30
            accs.append(acc)
        assert rep["average"][f"epoch{e}"] == pytest.approx(sum(accs) / 3, abs=0.01)
    # the fake epoch-N selector is better with N (skill 0.4 + 0.05 N): the rows are not copies
    assert rep["average"]["epoch1"] != rep["average"]["epoch3"]
    md = (report_dir / "report.md").read_text()
    assert "| shot | plan | baseline | epoch1 | epoch2 | epoch3 | random | retrieval | oracle |" in md
    assert "GRPO epoch checkpoints evaluated beside it" in md
    e2 = rep["accuracy"]["epoch2"]
    assert f"| 2 | {e2['1']:.2f} | {e2['2']:.2f} | {e2['3']:.2f} | {rep['average']['epoch2']:.2f} |" in md


def test_regression_section_is_the_regress_verdict(built):
    """The report's verdict is `lever regress`'s on the same report.json (CI-based, plan's rule)."""
    from lever.report.regression import judge

    store, plan, base, report_dir = built
    rep = json.loads((report_dir / "report.json").read_text())
    reg = rep["regression"]
    assert reg["available"] and reg["rule"] == plan.alerts.regression_rule == "strict"
    v = judge(rep, plan=plan.name, baseline="baseline", margin=plan.alerts.regression_margin, rule="strict")
    assert reg == json.loads(json.dumps(v.as_dict()))
    assert [s["shot"] for s in reg["shots"]] == ["1", "2", "3"]
    for s, c in zip(reg["shots"], rep["comparison"]):
        assert s["ci_high"] == pytest.approx(c["paired"]["high"]) and s["diff"] == pytest.approx(c["diff"])
        assert s["regression"] == (c["paired"]["high"] < -plan.alerts.regression_margin)
    # the rule comes from the plan's config: a `significant` plan gets that verdict
    sig = load_plan("plan1", "tiny", SMALL + ["alerts.regression_rule=significant", "alerts.regression_margin=0"])
    summary = run_plan(sig, store, baseline=base, stages=fake_stages(), jobs=1)
    rep2 = json.loads((Path(summary.report).parent / "report.json").read_text())
    want = judge(rep2, plan="plan1", baseline="baseline", margin=0.0, rule="significant")
    assert rep2["regression"]["rule"] == "significant" and rep2["regression"]["detected"] == want.regression
    assert [s["regression"] for s in rep2["regression"]["shots"]] == [
        c["diff"] < 0 and c["paired"]["high"] < 0 for c in rep2["comparison"]]


def test_compare_table(built):
    store, plan, base, _ = built
    table = compare_plans([plan, base, load_plan("plan2", "tiny", SMALL)], store, stages=fake_stages())
    names = [r["name"] for r in table["rows"]]
    assert names[:3] == ["plan1", "baseline", "plan2"] and names.count("random") == 1 and "retrieval" in names
    row = {r["name"]: r for r in table["rows"]}
    assert row["plan2"]["avg"] is None and row["plan2"]["acc"]["1"] is None  # never run
    best_avg = max(r["avg"] for r in table["rows"] if r["avg"] is not None)
    assert [r["name"] for r in table["rows"] if r["avg"] == best_avg] == table["best"]["avg"]
    md = render_markdown(table)
    assert "| plan1 |" in md and "**" in md and "—" in md
    # each plan's evaluated GRPO epochs, below the plans and above the references
    assert names[3:9] == ["plan1 epoch1", "plan1 epoch2", "plan1 epoch3", "plan2 epoch1", "plan2 epoch2", "plan2 epoch3"]
    assert {r["kind"] for r in table["rows"][3:9]} == {"epoch"} and names[9:] and "epoch" not in " ".join(names[9:])
    rep = json.loads((built[3] / "report.json").read_text())
    for e in (1, 2, 3):
        assert row[f"plan1 epoch{e}"]["acc"] == {k: pytest.approx(v, abs=0.006) for k, v in rep["accuracy"][f"epoch{e}"].items()}
    assert row["plan2 epoch1"]["avg"] is None
    assert not [n for n in (r["name"] for r in compare_plans([plan], store, stages=fake_stages(), epochs=False)["rows"])
                if "epoch" in n]


def test_partial_report_rewritten_for_same_run_id(built):
    store, plan, base, _ = built
    plan2 = load_plan("plan1", "tiny", SMALL + ["grpo.epochs=2"])
    first = Pipeline(plan2, store, stages=fake_stages(), baseline=base, run_id="r-again").run_partial("summarize")
    before = json.loads((store.open(first.key) / "report.json").read_text())
    # more inputs exist now: GRPO finished
    pipe = Pipeline(plan2, store, stages=fake_stages(), baseline=base, run_id="r-again")
    for name in ("train-grpo", "select-checkpoint"):
        pipe.run_stage(name)
    second = pipe.run_partial("summarize")
    after = json.loads((store.open(second.key) / "report.json").read_text())
    assert second.key == first.key and before["checkpoint"] is None and after["checkpoint"]["checkpoint"] == "grpo_epoch2"


def test_a_guard_stop_before_a_listed_epoch_is_reported_not_failed(tmp_path):
    """The real tiny pipeline (no fakes): plan1 lists GRPO epochs 1..3 for evaluation, and a guard
    with a KL limit of 1e-6 stops GRPO before epoch 3.  The run still finishes with a full report
    that names the unevaluated epochs and why."""
    from lever.pipeline.runner import run_plan

    over = ["infer.num_samples=8", "beam.num_queries=32", "rl_data.num_queries=32", "infer.shards=1", "infer.shots=[1,2]", "alerts.guard=stop", "alerts.kl_max=0.000001"]
    plan = load_plan("plan1", "tiny", over)
    base = load_baseline(plan, "tiny", over)
    summary = run_plan(plan, LocalStore(tmp_path / "store"), baseline=base, jobs=1)
    rep = json.loads((Path(summary.report).parent / "report.json").read_text())
    ep = rep["epoch_checkpoints"]
    assert not rep["partial"] and ep["requested"] == [1, 2, 3]
    last = min(int(e) for e in ep["stopped"]) - 1  # the guard's stop: after this epoch
    assert 1 <= last < 3 and set(ep["stopped"]) == {str(e) for e in range(last + 1, 4)}
    assert all("KL above 1e-06" in why for why in ep["stopped"].values())
    assert ep["evaluated"] == list(range(1, last + 1)) and ep["not_trained"] == [] and "epoch3" not in rep["accuracy"]
    assert rep["accuracy"][f"epoch{last}"]["1"] is not None
    md = (Path(summary.report).parent / "report.md").read_text()
    assert f"Not evaluated: epoch 3, never trained (train-grpo stopped after grpo epoch {last}" in md
