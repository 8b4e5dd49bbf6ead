"""Fast answer scoring: the same numbers as ``QwenVLM.answer_logprob``, with far less compute.

Where the plain path's time goes (measured on the tiny profile): the vision tower re-encodes every
image of every prompt on every call, and every prompt's shared prefix (system turn, the beam's
ICDs, or the whole prompt when several answers are scored against it) is recomputed per
candidate; on a model as small as the tiny one, per-token Python work (3-D rotary positions,
image splicing) is the next cost.  This path

1. encodes each image once and keeps its vision features (keyed by the image path; callers
   ``reset()`` per query so results never depend on what an earlier query cached), same-grid
   images together through the batched tower of ``lever.models.vision_batch``;
2. groups the (prompt, answer) pairs of a call by shared token prefix -- the whole prompt when it
   is scored with several answers (gt_prob), else everything before the last ICD (the beam's
   ICDs in a beam step: prompt order puts earlier picks first, see ``lever.models.prompting``),
   else the common system header -- and runs each prefix once, all groups in one left-padded pass;
3. runs the members' suffixes (minus the last answer token, after which no logit is needed),
   sorted by length, in right-padded passes that fill a token budget per device
   (``DEFAULT_MAX_TOKENS``), on top of the selected rows of the prefix key/value cache;
4. computes 3-D rotary positions for whole padded batches with tensor ops
   (``rope_positions_batch``): a suffix's positions are its own plus the prefix's next position;
5. sends only the hidden states of answer positions through the LM head;
6. hands the model each suffix pass's 4-D attention mask, built from what the pass knows.

Results agree with the plain path within float noise (tests assert 1e-4 in fp32; in practice
~1e-6).  On a GPU the same code runs in bf16 with SDPA attention (the model's own
implementation, chosen in ``build_lvlm``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from lever.models.answer_scores import geometric_mean_prob
from lever.models.lvlm import Encoded, QwenVLM
from lever.models.prompting import LRU, Example
from lever.models.vision_batch import BatchedVision

#: How far the fast path's mean answer log-prob may be from the plain path's, per model dtype.
#: fp32: float noise (observed ~1e-6).  bf16 (the GPU configuration): both paths compute the same
#: numbers with different kernels and reduction orders (a cached prefix + suffix passes vs one
#: pass), and bf16 keeps 8 significand bits, so one rounding of a logit near 8 is already 0.03;
#: averaged over the answer tokens the observed gap was ~1e-3 on the tiny model and ~4e-3 on
#: Qwen2.5-VL-3B.  2e-2 is five times the 3B figure and well under the InfoScore gains a beam ranks
#: by; tests/test_cluster_route.py holds the fast path to it in bf16, scripts/gpu_smoke.sh reports
#: the measured gap on the GPU against it.
LOGPROB_TOLERANCE: dict[str, float] = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


def rope_positions(ids: Sequence[int], grids: Sequence[tuple[int, int, int]], image_token_id: int, merge: int) -> list[list[int]]:
    """Qwen2.5-VL's 3-D rotary positions (temporal, height, width) of one unpadded sequence.

    The same rule as ``Qwen2_5_VLModel.get_rope_index`` for images, in plain Python because it
    runs for every scored prompt: text tokens advance all three by one; an image's merged
    patches get (start + t, start + row, start + col) and the next token starts at
    start + max(rows, cols).  Tests check it against the model's own function.
    """
    t_pos: list[int] = []
    h_pos: list[int] = []
    w_pos: list[int] = []
    pos, i, img, n = 0, 0, 0, len(ids)
    while i < n:
        if ids[i] == image_token_id:
            gt, gh, gw = grids[img]
            img += 1
            lh, lw = gh // merge, gw // merge
            for tt in range(gt):
                for hh in range(lh):
                    for ww in range(lw):
                        t_pos.append(pos + tt)
                        h_pos.append(pos + hh)
                        w_pos.append(pos + ww)
            i += gt * lh * lw
            pos += max(lh, lw)
        else:
            t_pos.append(pos)
            h_pos.append(pos)
            w_pos.append(pos)
            pos += 1
            i += 1
    return [t_pos, h_pos, w_pos]


def rope_positions_batch(
    ids: torch.Tensor,
    valid: torch.Tensor,
    grids: Sequence[Sequence[tuple[int, int, int]]],
    image_token_id: int,
    merge: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_positions` of every row of a padded batch at once: ([3, M, L], next [M]).

    Row r's valid tokens (``valid[r]``, padding on either side) get the positions
    ``rope_positions`` gives the unpadded row; padding gets 0.  ``grids[r]`` are the (t, h, w)
    grids of row r's images in order.  ``next[r]`` is the position the token after the row would
    get.  The rule only ever advances from a running position, so the positions of a suffix of a
    sequence are its own positions plus the prefix's ``next`` -- which is how the fast path
    positions suffixes without touching the prefix tokens again.  Vectorized because the
    per-token Python loop cost more than the suffix passes' attention on the tiny model.
    """
    valid = valid.bool()
    M, L = ids.shape
    is_img = (ids == image_token_id) & valid
    adv = valid.long()  # a text token advances all three axes by one
    zero = torch.zeros_like(adv)
    tt = hh = ww = zero
    n_img = max((len(g) for g in grids), default=0)
    if n_img and bool(is_img.any()):
        big = L + 1  # a padding "image" no token index reaches
        table = [[(gt * (gh // merge) * (gw // merge), gh // merge, gw // merge) for gt, gh, gw in g]
                 + [(big, 1, 1)] * (n_img - len(g)) for g in grids]
        info = torch.tensor(table, dtype=torch.long)  # [M, n_img, (tokens, rows, cols)]
        ntok, lh_t, lw_t = info[..., 0], info[..., 1], info[..., 2]
        ends = torch.cumsum(ntok, dim=1)
        k_all = torch.cumsum(is_img.long(), dim=1) - 1  # index among the row's image tokens
        which = torch.searchsorted(ends, k_all.clamp(min=0), right=True).clamp(max=n_img - 1)
        k = k_all - (ends - ntok).gather(1, which)  # index inside its own image
        lh, lw, nt = lh_t.gather(1, which), lw_t.gather(1, which), ntok.gather(1, which)
        tt = torch.where(is_img, k // (lh * lw), zero)
        hh = torch.where(is_img, (k // lw) % lh, zero)
        ww = torch.where(is_img, k % lw, zero)
        # an image advances by max(rows, cols), booked on its last token
        adv = torch.where(is_img, torch.where(k == nt - 1, torch.maximum(lh, lw), zero), adv)
    base = torch.cumsum(adv, dim=1) - adv
    pos = torch.stack([base + tt, base + hh, base + ww])
    return pos.masked_fill(~valid, 0), adv.sum(dim=1)


def _suffix_mask(keys: torch.Tensor, n_queries: int) -> torch.Tensor:
    """4-D boolean attention mask of a suffix pass: query i of a row (at sequence position
    prefix length + i) sees the row's valid keys up to its own position.  ``keys`` [M, Lk] marks
    the valid keys: the left-padded prefix, then the right-padded suffix.  A padding query (past
    its row's end) still sees the row's valid keys, so no row of the mask is empty; its output is
    never read."""
    lk = keys.shape[1]
    causal = torch.arange(lk)[None, :] <= torch.arange(lk - n_queries, lk)[:, None]
    return keys.bool()[:, None, None, :] & causal[None, None]


#: Token budget of one language-model pass of the fast path: rows x (padded prefix + padded fed
#: length), per device type.  On a GPU what bounds a pass is memory: 32k token positions of
#: Qwen2.5-VL-3B (36 layers, 2 KV heads of 128, bf16) are about 1.2 GB of key/value cache plus
#: ~0.8 GB of MLP activations, far below an 80 GB card, and large passes keep it busy.  On a CPU
#: passes that outgrow the caches get slower per token: measured on the tiny profile (2 cores,
#: K=64, B=5, S=2), one query's fast scoring took 70 ms at 6-8k, 76 ms at 16k and 89 ms at 32k
#: (a whole beam step of 315 rows in one pass).
DEFAULT_MAX_TOKENS = {"cpu": 8192, "cuda": 32768}


def default_max_tokens(device: torch.device) -> int:
    return DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cuda"])


class FastScorer:
    """Callable (prompts, answers) -> geometric-mean answer probabilities, like ``answer_prob``."""

    def __init__(self, lvlm: QwenVLM, max_batch: Optional[int] = None, max_tokens: Optional[int] = None) -> None:
        self.lvlm = lvlm
        self.model = lvlm.model
        # rows per pass are bounded by the token budget; ``max_batch`` optionally caps them too
        self.max_batch = max_batch
        self.max_tokens = max_tokens or default_max_tokens(lvlm.device)
        self.vision_start_id = int(lvlm.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
        self._features = LRU(maxsize=16384)
        self._vision = BatchedVision.for_model(self.model.model.visual)
        self.forwards = 0  # language-model passes
        self.vision_forwards = 0

    # ------------------------------------------------------------------ public

    def reset(self) -> None:
        """Forget cached vision features.  Stages call this at the start of every query: the
        features of an image then come from the same batched vision pass whatever ran before, so
        a query's numbers (and a resumed shard's bytes) do not depend on earlier queries."""
        self._features.clear()

    def __call__(self, prompts: list[list[Example]], answers: list[str]) -> list[float]:
        return [geometric_mean_prob(x) for x in self.answer_logprob(prompts, answers)]

    @torch.inference_mode()
    def answer_logprob(self, prompts: list[list[Example]], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        encoded = [self.lvlm.encode(p, a) for p, a in zip(prompts, answers)]
        out: list[float] = [0.0] * len(encoded)
        groups = self._groups(encoded)
        # groups without a prefix never share a prefix pass with others: a row of nothing but
        # padding there would attend to no key at all
        parts = self._budget_chunks([g for g in groups if g[0] > 0], lambda g: g[0])
        parts += [[g] for g in groups if g[0] == 0]
        for part in parts:
            for i, v in self._run_groups(encoded, part):
                out[i] = v
        return out

    @torch.inference_mode()
    def generate_and_score(self, prompts: list[list[Example]], answers: list[list[str]],
                           max_new_tokens: Optional[int] = None) -> tuple[list[str], list[list[float]]]:
        """Greedy generations of ``prompts`` and the mean answer log-probs of ``answers[i]``
        given prompt i, with each prompt read once.

        RL data needs both for every candidate: the verdict (generation) and ``gt_prob``
        (scoring the gt answers).  Done apart, the prompt -- most of the tokens -- goes through
        the model twice.  Here the batched greedy generation (``QwenVLM.generate_batches``, the
        very generation of the plain path) keeps its key/value cache; cut to the prompt minus
        its last token it is the prefix on which each answer is scored as a suffix
        (left padding puts every prompt's last token in the same column).  Same numbers as
        ``generate`` plus ``answer_logprob``, up to float noise."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
        lv = self.lvlm
        texts: list[str] = [""] * len(prompts)
        scores: list[list[float]] = [[0.0] * len(a) for a in answers]
        encoded = [lv.encode(p) for p in prompts]
        for idx, batch, inputs, batch_texts, cache in lv.generate_batches(encoded, max_new_tokens, keep_cache=True):
            for i, t in zip(idx, batch_texts):
                texts[i] = t
            L = inputs["input_ids"].shape[1]
            pids, pmask = inputs["input_ids"][:, :L - 1].cpu(), inputs["attention_mask"][:, :L - 1].cpu()
            _, pnext = rope_positions_batch(pids, pmask, [[im.grid for im in e.images] for e in batch],
                                            lv.image_token_id, lv.merge)
            flat: list[Encoded] = []
            groups: list[tuple[int, list[int]]] = []
            where: list[tuple[int, int]] = []
            for row, i in enumerate(idx):
                members = []
                for j, a in enumerate(answers[i]):
                    members.append(len(flat))
                    flat.append(lv.encode(prompts[i], a))
                    where.append((i, j))
                groups.append((len(batch[row].ids) - 1, members))
            pairs = [(g, m) for g, (_, ms) in enumerate(groups) for m in ms]
            for m, v in self._suffix_passes(flat, groups, pairs, {}, cache, pmask, pnext, [len(e.images) for e in batch]):
                i, j = where[m]
                scores[i][j] = v
        return texts, scores

    def _budget_chunks(self, items: list, length) -> list[list]:
        """Consecutive runs of ``items`` whose count x longest ``length`` fits the token budget
        (and ``max_batch``); always at least one item per run."""
        runs: list[list] = []
        cur: list = []
        longest = 0
        for it in items:
            n = max(longest, length(it))
            if cur and ((len(cur) + 1) * max(n, 1) > self.max_tokens
                        or (self.max_batch is not None and len(cur) >= self.max_batch)):
                runs.append(cur)
                cur, n = [], length(it)
            cur.append(it)
            longest = n
        if cur:
            runs.append(cur)
        return runs

    # ------------------------------------------------------------------ grouping

    def _key(self, e: Encoded, cut: int) -> tuple:
        """Identity of ids[:cut]: the tokens *and* the images behind its image placeholders
        (two prompts with equal text but different images have equal ids)."""
        head = e.ids[:cut]
        return tuple(head), tuple(im.key or id(im) for im in e.images[: head.count(self.vision_start_id)])

    def _groups(self, encoded: list[Encoded]) -> list[tuple[int, list[int]]]:
        """[(prefix length, member indices)]; members share ids[:prefix length] and its images."""
        groups: list[tuple[int, list[int]]] = []
        by_prompt: dict[tuple, list[int]] = {}
        for i, e in enumerate(encoded):
            by_prompt.setdefault(self._key(e, e.answer_start), []).append(i)
        left: list[int] = []
        for members in by_prompt.values():
            if len(members) > 1:
                groups.append((encoded[members[0]].answer_start - 1, members))
            else:
                left.extend(members)
        by_icds: dict[tuple, list[int]] = {}
        cuts: dict[int, int] = {}
        for i in sorted(left):
            e = encoded[i]
            cuts[i] = self._second_last_image_start(e)
            by_icds.setdefault(self._key(e, cuts[i]), []).append(i)
        rest: list[int] = []
        for members in by_icds.values():
            if len(members) > 1 and cuts[members[0]] > 0:
                groups.append((cuts[members[0]], members))
            else:
                rest.extend(members)
        if rest:  # share at least the common text header (system turn, user marker)
            first = encoded[rest[0]].ids
            lcp = min(encoded[i].answer_start - 1 for i in rest)
            for i in rest:
                ids = encoded[i].ids
                k = 0
                while k < lcp and ids[k] == first[k]:
                    k += 1
                lcp = k
            if self.vision_start_id in first[:lcp]:  # stop before the first image
                lcp = first.index(self.vision_start_id)
            groups.append((lcp, sorted(rest)))
        # groups with the very same prefix become one (the zero-shot prompt's header group and
        # the first beam step's, which share the system header): one prefix row, not two
        merged: dict[tuple, list[int]] = {}
        out: list[tuple[int, list[int]]] = []
        for plen, members in groups:
            key = (plen, self._key(encoded[members[0]], plen))
            if key in merged:
                merged[key].extend(members)
            else:
                merged[key] = list(members)
                out.append((plen, merged[key]))
        return out

    def _second_last_image_start(self, e: Encoded) -> int:
        """Where the prompt's last ICD begins (its image's vision-start token), or 0 with fewer
        than two images before the answer."""
        starts: list[int] = []
        t = -1
        vs = self.vision_start_id
        try:
            while True:
                t = e.ids.index(vs, t + 1, e.answer_start)
                starts.append(t)
        except ValueError:
            pass
        return starts[-2] if len(starts) >= 2 else 0

    # ------------------------------------------------------------------ vision

    def _image_features(self, encoded: list[Encoded], idx: Sequence[int]) -> dict[int, torch.Tensor]:
        """id(ProcessedImage) -> merged vision features [n_tokens, hidden], computed once."""
        need: list[Any] = []
        seen: set[int] = set()
        for i in idx:
            for im in encoded[i].images:
                if id(im) in seen:
                    continue
                seen.add(id(im))
                if im.key is None or im.key not in self._features:
                    need.append(im)
        local: dict[int, torch.Tensor] = {}
        # images of one grid go through the batched tower together, in order of first use, in
        # passes within the budget (in patches: the tower attends within each image)
        by_grid: dict[tuple[int, int, int], list[Any]] = {}
        for im in need:
            by_grid.setdefault(im.grid, []).append(im)
        for grid, ims in by_grid.items():
            per = max(1, (4 * self.max_tokens) // max(1, ims[0].pixel_values.shape[0]))
            for s in range(0, len(ims), per):
                chunk = ims[s:s + per]
                pv = torch.cat([im.pixel_values for im in chunk]).to(self.lvlm.device, self.lvlm.dtype)
                feats = self._vision(pv, grid, len(chunk))
                self.vision_forwards += 1
                for im, feat in zip(chunk, feats):
                    if im.key is None:
                        local[id(im)] = feat
                    else:
                        self._features[im.key] = feat
        out: dict[int, torch.Tensor] = {}
        for i in idx:
            for im in encoded[i].images:
                out[id(im)] = self._features[im.key] if im.key is not None else local[id(im)]
        return out

    def _embed(self, ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by ``feats`` (all images of the
        batch, row by row in order: boolean indexing fills placeholders in the same order)."""
        emb = self.model.model.get_input_embeddings()(ids)
        if feats:
            mask = ids == self.lvlm.image_token_id
            flat = torch.cat(feats).to(emb.dtype)
            if int(mask.sum()) != flat.shape[0]:
                raise AssertionError(f"{int(mask.sum())} image placeholders but {flat.shape[0]} feature rows")
            emb[mask] = flat
        return emb

    # ------------------------------------------------------------------ forward

    def _n_images(self, e: Encoded, cut: int) -> int:
        """Images wholly inside ids[:cut]; a cut inside an image is a bug, not a case."""
        n = e.ids[:cut].count(self.vision_start_id)
        if sum(im.n_tokens for im in e.images[:n]) != e.ids[:cut].count(self.lvlm.image_token_id):
            raise AssertionError("prefix boundary cuts an image")
        return n

    def _prefix_cache(self, encoded: list[Encoded], groups: list[tuple[int, list[int]]], feats):
        """One left-padded pass over the groups' prefixes.

        Returns (cache with a row per group or None, prefix mask [G, Lp], next rotary position
        [G], images inside each prefix [G])."""
        from transformers import DynamicCache

        G = len(groups)
        Lp = max(plen for plen, _ in groups)
        n_pre = [self._n_images(encoded[m[0]], plen) for plen, m in groups]
        if Lp == 0:
            return None, torch.zeros((G, 0), dtype=torch.long), torch.zeros(G, dtype=torch.long), n_pre
        pad = self.lvlm.pad_id
        rows = [[pad] * (Lp - plen) + encoded[m[0]].ids[:plen] for plen, m in groups]
        pids = torch.tensor(rows, dtype=torch.long)
        pmask = (torch.arange(Lp) >= torch.tensor([Lp - plen for plen, _ in groups])[:, None]).long()
        imgs = [encoded[m[0]].images[:n] for (_, m), n in zip(groups, n_pre)]
        ppos, nxt = rope_positions_batch(pids, pmask, [[im.grid for im in x] for x in imgs],
                                         self.lvlm.image_token_id, self.lvlm.merge)
        dev = self.lvlm.device
        cache = DynamicCache(config=self.model.config.text_config)
        pids = pids.to(dev)
        self.model.model.language_model(
            inputs_embeds=self._embed(pids, [feats[id(im)] for x in imgs for im in x]),
            attention_mask=pmask.to(dev), position_ids=ppos.to(dev), cache=cache, use_cache=True)
        self.forwards += 1
        self.lvlm.calls += 1  # telemetry counts LVLM passes of either path
        return cache, pmask, nxt, n_pre

    def _select(self, cache: Any, rows: torch.Tensor, length: Optional[int] = None):
        """A cache holding the given rows of ``cache`` (which stays intact for other chunks),
        cut to its first ``length`` positions if given.  A chunk whose rows all come from one
        group expands that row (a view, no copy)."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.model.config.text_config)
        single = bool((rows == rows[0]).all())
        r0 = int(rows[0])
        cut = slice(None) if length is None else slice(0, length)
        for li, layer in enumerate(cache.layers):
            if single:
                k = layer.keys[r0: r0 + 1, :, cut].expand(len(rows), -1, -1, -1)
                v = layer.values[r0: r0 + 1, :, cut].expand(len(rows), -1, -1, -1)
            else:
                k, v = layer.keys[rows][:, :, cut], layer.values[rows][:, :, cut]
            out.update(k, v, li)
        return out

    def _run_groups(self, encoded: list[Encoded], groups: list[tuple[int, list[int]]]):
        """Prefixes of these groups in one pass, then their members' suffixes in passes that
        fill the token budget (rows sorted by suffix length, so padding stays small)."""
        members = [(g, i) for g, (_, part) in enumerate(groups) for i in part]
        if len(members) == len(groups):  # nothing is shared: one pass over whole sequences
            groups = [(0, [i for _, i in members])]
            members = [(0, i) for _, i in members]
        feats = self._image_features(encoded, [i for _, i in members])
        cache, pmask, pnext, n_pre = self._prefix_cache(encoded, groups, feats)
        yield from self._suffix_passes(encoded, groups, members, feats, cache, pmask, pnext, n_pre)

    def _suffix_passes(self, encoded, groups, members, feats, cache, pmask, pnext, n_pre):
        """The members' suffixes on top of their groups' prefix rows (``cache``, possibly longer
        than ``pmask``'s columns: it is cut to them), in passes that fill the token budget;
        rows sorted by suffix length, so padding stays small."""
        Lp = pmask.shape[1]
        # the fed part of a row: everything after its prefix but the last answer token (no
        # logit is needed after it)
        fed = {i: len(encoded[i].ids) - 1 - groups[g][0] for g, i in members}
        members = sorted(members, key=lambda m: (fed[m[1]], m[1]))
        for chunk in self._budget_chunks(members, lambda m: Lp + fed[m[1]]):
            rows = torch.tensor([g for g, _ in chunk])
            sub = None if cache is None else self._select(cache, rows.to(self.lvlm.device), Lp)
            yield from self._run_suffixes(encoded, groups, chunk, feats, sub, pmask[rows],
                                          pnext[rows], n_pre)

    def _decoder(self, embeds: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The text model on a suffix pass; ``keys`` [rows, prefix + suffix] marks valid keys.

        The model accepts a prepared 4-D mask for its full-attention layers (as ``generate``
        passes one); building it here from what the pass already knows is cheaper than having
        the model derive it from the 2-D mask and the cache on every pass.  A model with
        sliding-window layers gets the 2-D mask and builds its own."""
        lm = self.model.model.language_model
        dev = self.lvlm.device
        if getattr(lm, "has_sliding_layers", False):
            mask: Any = keys.to(dev)
        else:
            mask = {"full_attention": _suffix_mask(keys, embeds.shape[1]).to(dev)}
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                  use_cache=cache is not None).last_hidden_state

    def _run_suffixes(self, encoded, groups, members, feats, cache, pmask, pnext, n_pre):
        """One right-padded pass over the members' suffixes on top of their prefix rows; the
        mean log-prob of each member's answer tokens."""
        dev = self.lvlm.device
        pad = self.lvlm.pad_id
        M = len(members)
        flat: list[int] = []
        lens: list[int] = []
        for g, i in members:
            ids = encoded[i].ids
            flat.extend(ids[groups[g][0]: -1])
            lens.append(len(ids) - 1 - groups[g][0])
        Ls = max(lens)
        valid = torch.arange(Ls) < torch.tensor(lens)[:, None]
        sids = torch.full((M, Ls), pad, dtype=torch.long)
        sids[valid] = torch.tensor(flat, dtype=torch.long)  # row-major: each row's tokens in order
        smask = valid.long()
        imgs = [encoded[i].images[n_pre[g]:] for g, i in members]
        rel, _ = rope_positions_batch(sids, smask, [[im.grid for im in x] for x in imgs],
                                      self.lvlm.image_token_id, self.lvlm.merge)
        spos = (rel + pnext[None, :, None]) * smask  # the full sequence's positions
        keys = torch.cat([pmask, smask], dim=1) if cache is not None else smask
        sids = sids.to(dev)
        hidden = self._decoder(self._embed(sids, [feats[id(im)] for x in imgs for im in x]), keys,
                               spos.to(dev), cache)
        self.forwards += 1
        self.lvlm.calls += 1  # telemetry counts LVLM passes of either path
        # the hidden states that predict the answer tokens, for every row at once
        a0 = torch.tensor([encoded[i].answer_start - groups[g][0] for g, i in members])
        n = torch.tensor([encoded[i].n_answer for _, i in members])
        targets = torch.tensor([t for _, i in members for t in encoded[i].ids[encoded[i].answer_start:]])
        owner = torch.repeat_interleave(torch.arange(M), n)
        first = torch.cumsum(n, 0) - n
        cols = torch.repeat_interleave(a0 - 1 - first, n) + torch.arange(int(n.sum()))
        h = hidden[owner.to(dev), cols.to(dev)]
        lp = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)
        tok = lp.gather(-1, targets.to(dev).unsqueeze(-1)).squeeze(-1).cpu().double()
        sums = torch.zeros(M, dtype=torch.float64).index_add_(0, owner, tok)
        means = (sums / n.double()).tolist()
        return [(i, means[r]) for r, (_, i) in enumerate(members)]
