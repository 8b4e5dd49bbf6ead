"""The pointer selector (SPEC section 3) and the one log-prob function every stage shares.

Why one module: the seeds' trainers computed sequence log-probs three different ways (training,
validation, GRPO's old/reference policies) and disagreed with each other; here v2 training, RCE,
GRPO, validation and inference all go through :func:`step_logprobs` / :func:`sequence_logprob`.

Architecture (per query, pool of K candidates, ``hidden`` = h):

* ``query_proj``: d -> h, ``cand_proj``: d -> h (candidate states ``c`` computed once per query).
* state ``s_0 = query_proj(query)``.
* at step t: ``z = s_t``; for each of the L layers: ``z = LN(z + drop(MHA(z, c, c)))`` (the query
  attends over the still-allowed candidates only).  Then
  ``logit_k = cos(score_q(z), score_c(c_k)) / temperature``; candidates already chosen (or outside
  ``cand_mask``) get ``-inf``.  ``score_q`` / ``score_c`` are the final "scoring layers" -- the only
  parameters trained when GRPO freezes the backbone (:data:`SCORING_PREFIXES`).
* state update (the autoregressive part): after choosing candidate ``k``,
  ``s_{t+1} = LN_u(s_t + update(c_k))``.  A residual additive update keeps the query identity in the
  state while letting the next step know what is already shown; masking guarantees no repeats.

Shapes: ``query_emb [B, d]``, ``cand_emb [B, K, d]``, ``seqs [B, S]`` (positions into the pool),
``cand_mask [B, K]`` bool (True = pickable; pools of different size are right-padded).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lever.config.schema import SelectorConfig

NEG_INF = float("-inf")
#: parameter-name prefixes of the final projection / scoring layers (trained under freeze_backbone)
SCORING_PREFIXES: tuple[str, ...] = ("score_q.", "score_c.")


class CrossAttentionLayer(nn.Module):
    """Query-over-candidates attention with a residual connection and LayerNorm."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"selector.hidden={hidden} is not divisible by selector.heads={heads}")
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = dropout

    def forward(self, z: torch.Tensor, c: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # z [B, h], c [B, K, h], allowed [B, K] (True = attend); every row has >= 1 allowed.
        out, _ = self.attn(z.unsqueeze(1), c, c, key_padding_mask=~allowed, need_weights=False)
        out = F.dropout(out.squeeze(1), p=self.dropout, training=self.training)
        return self.norm(z + out)


class PointerSelector(nn.Module):
    """v2/v3 pointer selector; see the module docstring for the architecture."""

    def __init__(self, embed_dim: int, cfg: SelectorConfig) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.cfg = cfg
        h = cfg.hidden
        self.query_proj = nn.Linear(embed_dim, h)
        self.cand_proj = nn.Linear(embed_dim, h)
        self.layers = nn.ModuleList([CrossAttentionLayer(h, cfg.heads, cfg.dropout) for _ in range(cfg.layers)])
        self.update = nn.Linear(h, h)
        self.update_norm = nn.LayerNorm(h)
        self.score_q = nn.Linear(h, h)
        self.score_c = nn.Linear(h, h)
        self.temperature = float(cfg.temperature)
        self.dropout = float(cfg.dropout)
        if getattr(cfg, "init", "default") == "siamese":
            self._siamese_init()

    @torch.no_grad()
    def _siamese_init(self) -> None:
        """Start as retrieval: one orthogonal projection on both sides, identity scoring layers and
        zero cross-attention outputs (residual branches that start as the identity), so the first
        scores are the cosine of the embeddings, up to the query path's LayerNorm."""
        nn.init.orthogonal_(self.query_proj.weight)
        self.cand_proj.weight.copy_(self.query_proj.weight)
        for lin in (self.query_proj, self.cand_proj):
            lin.bias.zero_()
        for lin in (self.score_q, self.score_c):
            lin.weight.copy_(torch.eye(lin.weight.shape[0]))
            lin.bias.zero_()
        for layer in self.layers:
            layer.attn.out_proj.weight.zero_()
            layer.attn.out_proj.bias.zero_()

    # -- building blocks -------------------------------------------------------------------
    def encode(self, query_emb: torch.Tensor, cand_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial state [B,h], candidate states [B,K,h] and normalized candidate keys [B,K,h]."""
        s = F.dropout(self.query_proj(query_emb), p=self.dropout, training=self.training)
        c = F.dropout(self.cand_proj(cand_emb), p=self.dropout, training=self.training)
        keys = F.normalize(self.score_c(c), dim=-1)
        return s, c, keys

    def step_logits(self, s: torch.Tensor, c: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Logits [B,K] of the next pick; ``-inf`` where not allowed."""
        z = s
        for layer in self.layers:
            z = layer(z, c, allowed)
        q = F.normalize(self.score_q(z), dim=-1)
        logits = torch.einsum("bh,bkh->bk", q, keys) / self.temperature
        return logits.masked_fill(~allowed, NEG_INF)

    def advance(self, s: torch.Tensor, c: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """New state after choosing positions ``chosen`` [B]."""
        picked = c.gather(1, chosen.view(-1, 1, 1).expand(-1, 1, c.size(-1))).squeeze(1)
        return self.update_norm(s + self.update(picked))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Everything except the scoring layers (frozen by ``grpo.freeze_backbone``)."""
        for name, p in self.named_parameters():
            if not name.startswith(SCORING_PREFIXES):
                yield p


# -- helpers ------------------------------------------------------------------------------------

def _full_mask(cand_emb: torch.Tensor, cand_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if cand_mask is None:
        return torch.ones(cand_emb.shape[:2], dtype=torch.bool, device=cand_emb.device)
    if cand_mask.shape != cand_emb.shape[:2]:
        raise ValueError(f"cand_mask shape {tuple(cand_mask.shape)} != cand_emb[:2] {tuple(cand_emb.shape[:2])}")
    return cand_mask.to(torch.bool)


def _check_shots(allowed: torch.Tensor, shots: int) -> None:
    """Fail loudly when a sequence of ``shots`` distinct picks is impossible (the seeds' K=2 bug)."""
    have = int(allowed.sum(-1).min().item()) if allowed.numel() else 0
    if shots > have:
        raise ValueError(f"asked for {shots} shots but a pool offers only {have} pickable candidates")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off for the duration (log-probs for GRPO old/reference, decoding); restores the mode."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# -- the shared log-prob functions ---------------------------------------------------------------

def step_logprobs(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    seqs: torch.Tensor,
    cand_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Teacher-forced per-step log-distributions [B,S,K] over the still-allowed candidates.

    Entries for disallowed candidates are ``-inf`` (their probability is exactly 0), so exact KL
    and entropy over the pointer's candidate distribution (:mod:`lever.rl.losses`) can be computed
    from this tensor.
    """
    allowed = _full_mask(cand_emb, cand_mask).clone()
    seqs = seqs.long()
    if seqs.dim() != 2 or seqs.size(0) != query_emb.size(0):
        raise ValueError(f"seqs must be [B,S] with B={query_emb.size(0)}, got {tuple(seqs.shape)}")
    _check_shots(allowed, seqs.size(1))
    s, c, keys = model.encode(query_emb, cand_emb)
    out = []
    for t in range(seqs.size(1)):
        pos = seqs[:, t]
        ok = allowed.gather(1, pos.view(-1, 1)).squeeze(1)
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0].item())
            raise ValueError(f"sequence row {bad} picks position {int(pos[bad])} at step {t}, which is masked or repeated")
        out.append(torch.log_softmax(model.step_logits(s, c, keys, allowed), dim=-1))
        allowed = allowed.scatter(1, pos.view(-1, 1), False)
        s = model.advance(s, c, pos)
    return torch.stack(out, dim=1)


def gather_sequence(step_lp: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Sequence log-prob [B] from per-step distributions [B,S,K] and the picks [B,S]."""
    return step_lp.gather(2, seqs.long().unsqueeze(-1)).squeeze(-1).sum(-1)


def sequence_logprob(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    seqs: torch.Tensor,
    cand_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log p(seq | query, pool) [B] = sum over steps of log-softmax over still-allowed candidates."""
    return gather_sequence(step_logprobs(model, query_emb, cand_emb, seqs, cand_mask), seqs)


# -- decoding ------------------------------------------------------------------------------------

@torch.no_grad()
def greedy(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    shots: int,
    cand_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Argmax decoding, batched: [B, shots] positions (dropout off)."""
    allowed = _full_mask(cand_emb, cand_mask).clone()
    _check_shots(allowed, shots)
    with eval_mode(model):
        s, c, keys = model.encode(query_emb, cand_emb)
        picks = []
        for _ in range(shots):
            pos = model.step_logits(s, c, keys, allowed).argmax(-1)
            picks.append(pos)
            allowed = allowed.scatter(1, pos.view(-1, 1), False)
            s = model.advance(s, c, pos)
    return torch.stack(picks, dim=1) if picks else torch.zeros(query_emb.size(0), 0, dtype=torch.long,
                                                             device=query_emb.device)


@torch.no_grad()
def beam_search(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    shots: int,
    beam_size: int,
    cand_mask: Optional[torch.Tensor] = None,
) -> list[tuple[list[int], float]]:
    """Top ``beam_size`` sequences for one query (``query_emb [d]``, ``cand_emb [K,d]``), best first.

    Returns ``(positions, logp)`` with logp the model's sequence log-prob (dropout off).
    """
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    mask = _full_mask(cand_emb.unsqueeze(0), None if cand_mask is None else cand_mask.unsqueeze(0))
    _check_shots(mask, shots)
    with eval_mode(model):
        s, c, keys = model.encode(query_emb.unsqueeze(0), cand_emb.unsqueeze(0))
        seqs: list[list[int]] = [[]]
        scores = torch.zeros(1, device=query_emb.device)
        allowed = mask
        for _ in range(shots):
            n = len(seqs)
            lp = torch.log_softmax(model.step_logits(s, c.expand(n, -1, -1), keys.expand(n, -1, -1), allowed), -1)
            total = (scores.view(-1, 1) + lp).view(-1)
            k = min(beam_size, int(torch.isfinite(total).sum()))
            top, idx = total.topk(k)
            K = lp.size(1)
            rows, pos = idx // K, idx % K
            seqs = [seqs[r] + [int(p)] for r, p in zip(rows.tolist(), pos.tolist())]
            scores = top
            allowed = allowed[rows].scatter(1, pos.view(-1, 1), False)
            s = model.advance(s[rows], c.expand(k, -1, -1), pos)
    return [(seq, float(sc)) for seq, sc in zip(seqs, scores.tolist())]


@torch.no_grad()
def sample(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    shots: int,
    temperature: float,
    n: int,
    generator: Optional[torch.Generator] = None,
    cand_mask: Optional[torch.Tensor] = None,
) -> list[tuple[list[int], float]]:
    """``n`` sequences for one query sampled from softmax(logits / temperature) (dropout off).

    The returned logp is the model's own (temperature-1) sequence log-prob, the quantity stored as
    a v2 candidate's score in the RL data.  Duplicates are possible; the caller de-duplicates.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = _full_mask(cand_emb.unsqueeze(0), None if cand_mask is None else cand_mask.unsqueeze(0))
    _check_shots(mask, shots)
    if n <= 0:
        return []
    with eval_mode(model):
        s, c, keys = model.encode(query_emb.unsqueeze(0).expand(n, -1), cand_emb.unsqueeze(0).expand(n, -1, -1))
        allowed = mask.expand(n, -1).clone()
        total = torch.zeros(n, device=query_emb.device)
        picks = []
        for _ in range(shots):
            logits = model.step_logits(s, c, keys, allowed)
            probs = torch.softmax(logits / temperature, -1)
            # drawn on the CPU so a CPU generator drives GPU runs too (same stream of draws)
            pos = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
            total += torch.log_softmax(logits, -1).gather(1, pos.view(-1, 1)).squeeze(1)
            picks.append(pos)
            allowed = allowed.scatter(1, pos.view(-1, 1), False)
            s = model.advance(s, c, pos)
    seqs = torch.stack(picks, 1).tolist()
    return [(seq, float(lp)) for seq, lp in zip(seqs, total.tolist())]


@torch.no_grad()
def sample_batch(
    model: PointerSelector,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    shots: int,
    n: int,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    cand_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``n`` sequences per query for a batch of B queries (``query_emb [B,d]``, ``cand_emb [B,K,d]``):
    positions [B, n, shots] from softmax(logits / temperature), dropout off.

    Online GRPO samples whole rounds of groups at once; the draws come from ``generator`` on the
    CPU in one fixed order (query-major), so a seeded run and its resumed copy draw identically.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, K = cand_emb.shape[:2]
    mask = _full_mask(cand_emb, cand_mask)
    _check_shots(mask, shots)
    if n <= 0 or B == 0:
        return torch.zeros(B, max(n, 0), shots, dtype=torch.long, device=cand_emb.device)
    q = query_emb.repeat_interleave(n, 0)
    c_in = cand_emb.repeat_interleave(n, 0)
    allowed = mask.repeat_interleave(n, 0).clone()
    with eval_mode(model):
        s, c, keys = model.encode(q, c_in)
        picks = []
        for _ in range(shots):
            probs = torch.softmax(model.step_logits(s, c, keys, allowed) / temperature, -1)
            pos = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
            picks.append(pos)
            allowed = allowed.scatter(1, pos.view(-1, 1), False)
            s = model.advance(s, c, pos)
    return torch.stack(picks, 1).view(B, n, shots)


def build_selector(embed_dim: int, cfg: SelectorConfig, seed: Optional[int] = None) -> PointerSelector:
    """A freshly initialised selector; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return PointerSelector(embed_dim, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PointerSelector(embed_dim, cfg)
