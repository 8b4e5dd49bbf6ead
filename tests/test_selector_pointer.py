"""Pointer selector: log-probs are a proper distribution over sequences, decoding agrees with them."""

from __future__ import annotations

import itertools

import pytest
import torch

from lever.config.schema import SelectorConfig
from lever.rl.losses import entropy, exact_kl
from lever.selectors.pointer import (
    beam_search,
    build_selector,
    greedy,
    sample,
    sequence_logprob,
    step_logprobs,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on the shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(layers: int = 1, dropout: float = 0.3, seed: int = 0):
    return build_selector(8, SelectorConfig(hidden=16, layers=layers, heads=2, dropout=dropout), seed=seed)


def _inputs(B: int = 3, K: int = 6, d: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g), torch.randn(B, K, d, generator=g)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_sequence_probabilities_sum_to_one_over_all_ordered_sequences(layers):
    m = _model(layers).eval()
    q, c = _inputs(B=1, K=5)
    mask = torch.tensor([[True, True, False, True, True]])
    seqs = [s for s in itertools.permutations([0, 1, 3, 4], 2)]
    lp = sequence_logprob(m, q.expand(len(seqs), -1), c.expand(len(seqs), -1, -1), torch.tensor(seqs),
                          mask.expand(len(seqs), -1))
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_step_logprobs_mask_chosen_and_padded_candidates():
    m = _model().eval()
    q, c = _inputs(B=2, K=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    seqs = torch.tensor([[2, 5, 0], [1, 3, 0]])
    lp = step_logprobs(m, q, c, seqs, mask)
    assert lp.shape == (2, 3, 6)
    assert torch.isneginf(lp[0, 1, 2]) and torch.isneginf(lp[0, 2, 5]) and torch.isneginf(lp[0, 2, 2])
    assert torch.isneginf(lp[1, :, 4:]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    # the sequence log-prob is the sum of the picked entries
    manual = sum(lp[0, t, seqs[0, t]] for t in range(3))
    assert torch.allclose(sequence_logprob(m, q, c, seqs, mask)[0], manual)


def test_padding_a_pool_does_not_change_logprobs():
    m = _model().eval()
    q, c = _inputs(B=1, K=5)
    padded = torch.cat([c, torch.randn(1, 3, 8)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    seqs = torch.tensor([[4, 0]])
    assert torch.allclose(sequence_logprob(m, q, c, seqs), sequence_logprob(m, q, padded, seqs, mask), atol=1e-6)


def test_repeated_or_masked_pick_is_rejected():
    m = _model().eval()
    q, c = _inputs(B=1, K=4)
    with pytest.raises(ValueError, match="masked or repeated"):
        sequence_logprob(m, q, c, torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="masked or repeated"):
        sequence_logprob(m, q, c, torch.tensor([[3, 1]]), torch.tensor([[True, True, True, False]]))


def test_more_shots_than_pickable_candidates_fails_loudly():
    m = _model().eval()
    q, c = _inputs(B=1, K=2)
    with pytest.raises(ValueError, match="3 shots"):
        greedy(m, q, c, 3)
    with pytest.raises(ValueError, match="3 shots"):
        beam_search(m, q[0], c[0], 3, 2)


def test_beam_search_is_exact_on_a_small_pool_and_greedy_matches_beam_one():
    m = _model(layers=2).eval()
    q, c = _inputs(B=1, K=5)
    beams = beam_search(m, q[0], c[0], shots=2, beam_size=20)
    all_seqs = torch.tensor(list(itertools.permutations(range(5), 2)))
    lp = sequence_logprob(m, q.expand(20, -1), c.expand(20, -1, -1), all_seqs)
    best = sorted(zip(lp.tolist(), all_seqs.tolist()), reverse=True)
    assert [b[0] for b in beams] == [s for _, s in best]
    for (pos, score), (ref, _) in zip(beams, best):
        assert score == pytest.approx(ref, abs=1e-5)
    g = greedy(m, q, c, 2)
    assert g[0].tolist() == beam_search(m, q[0], c[0], 2, 1)[0][0]


def test_sample_logp_is_the_model_sequence_logprob_and_seeded():
    m = _model().eval()
    q, c = _inputs(B=1, K=6)
    a = sample(m, q[0], c[0], 3, temperature=1.3, n=8, generator=torch.Generator().manual_seed(0))
    b = sample(m, q[0], c[0], 3, temperature=1.3, n=8, generator=torch.Generator().manual_seed(0))
    assert a == b
    for pos, lp in a:
        assert len(set(pos)) == 3
        ref = sequence_logprob(m, q, c, torch.tensor([pos]))
        assert lp == pytest.approx(float(ref.detach()), abs=1e-5)


def test_decoding_turns_dropout_off_and_restores_training_mode():
    m = _model(dropout=0.9)
    m.train()
    q, c = _inputs(B=4, K=8)
    assert torch.equal(greedy(m, q, c, 3), greedy(m, q, c, 3))
    assert m.training


def test_exact_kl_matches_brute_force_sum_and_is_zero_for_identical_models():
    p, r = _model(seed=0).eval(), _model(seed=1).eval()
    q, c = _inputs(B=1, K=4)
    seqs = torch.tensor([[2, 0]])
    with torch.no_grad():
        lp, lr = step_logprobs(p, q, c, seqs), step_logprobs(r, q, c, seqs)
    brute = 0.0
    for t in range(2):
        for k in range(4):
            if torch.isfinite(lp[0, t, k]):
                brute += float(lp[0, t, k].exp() * (lp[0, t, k] - lr[0, t, k]))
    assert float(exact_kl(lp, lr)[0]) == pytest.approx(brute, abs=1e-6)
    assert float(exact_kl(lp, lp)[0]) == 0.0
    assert float(entropy(lp)[0]) > 0


@pytest.mark.parametrize("init", ["siamese", "default"])
def test_siamese_init_scores_by_cosine_of_shared_projection(init):
    """`selector.init: siamese` starts as retrieval: the first pick's logits are the cosine of
    LayerNorm(W q) and W c over the temperature, W one orthogonal matrix shared by both sides.
    The default initialisation must not satisfy this (otherwise the test proves nothing)."""
    cfg = SelectorConfig(hidden=8, layers=2, heads=2, dropout=0.0, temperature=0.5, init=init)
    model = build_selector(8, cfg, seed=3).eval()
    q, c = _inputs(B=2, K=5, d=8, seed=4)
    with torch.no_grad():
        s, cs, keys = model.encode(q, c)
        got = model.step_logits(s, cs, keys, torch.ones(2, 5, dtype=torch.bool))
        w = model.query_proj.weight
        qs = torch.nn.functional.layer_norm(q @ w.T, (8,))
        for _ in range(1, cfg.layers):  # each layer's LayerNorm of an unchanged residual
            qs = torch.nn.functional.layer_norm(qs, (8,))
        want = torch.nn.functional.cosine_similarity(qs.unsqueeze(1), c @ w.T, dim=-1) / cfg.temperature
    if init == "siamese":
        assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)
        assert torch.allclose(got, want, atol=1e-4)
    else:
        assert not torch.allclose(got, want, atol=1e-2)
