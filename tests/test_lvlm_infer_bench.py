"""``lever bench infer``: batched greedy generation (the infer stage's path) equals one-by-one."""

from __future__ import annotations

from lever_tiny_env import tiny_lvlm, tiny_plan


def test_batched_generation_equals_one_by_one_on_the_bench_prompts():
    from lever.bench.infer import run_infer_bench

    lvlm = tiny_lvlm()
    lines: list[str] = []
    res = run_infer_bench(tiny_plan().lvlm, shots=(0, 2), n_queries=6, n_train=16, repeats=1, echo=lines.append)
    assert [r.shot for r in res] == [0, 2]
    assert all(r.identical == r.queries == 6 for r in res)
    assert any(x.startswith("agreement: 12/12") and "(ok)" in x for x in lines)
    assert any(x.startswith("models: 1 LVLM instance shared by all 2 shots") for x in lines)
    assert lines[-1].startswith("speedup: ") and float(lines[-1].split()[1]) > 0
    assert lvlm.batch_size > 1  # the fast path really batches


def test_mixed_length_batch_generates_what_each_prompt_generates_alone():
    """Prompts of 0..3 ICDs in one left-padded batch (the longest sets the padding)."""
    from lever.data.dataset import load_index
    from lever.models.prompting import icd_example, query_example

    from lever_tiny_env import tiny_data

    lvlm = tiny_lvlm()
    index = load_index(tiny_data() / "prepare-data")
    prompts = [[icd_example(index.train[i]) for i in range(k, 2 * k)] + [query_example(index.val[k])] for k in range(4)]
    prompts += [[query_example(index.val[j])] for j in range(4, 8)]
    batched = lvlm.generate(prompts, max_new_tokens=5)
    assert batched == [lvlm.generate([p], max_new_tokens=5)[0] for p in prompts]
