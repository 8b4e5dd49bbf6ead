"""Epoch-boundary training state, so a killed training stage resumes bit-identically.

The stage's staging dir survives a kill (DESIGN.md); after every finished epoch (after its
checkpoint, metrics row and hooks) the loops write ``{prefix}_state.safetensors`` holding
everything the next epoch depends on: weights (``model.*``), AdamW moments and step counts
(``opt.{i}.{name}``), the frozen old policy of an unfinished GRPO round (``old.*``), the shuffle
generator and torch's global RNG (dropout) as byte tensors (``rng.*``), and ``meta.json`` (UTF-8
bytes as a uint8 tensor) with the epoch, global step (tau schedule), beta and the round position.  A rerun on the
same dir loads it and continues with the next epoch; a kill before the first state (inside
epoch 1) simply restarts.  Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from lever.selectors.checkpoint import atomic_save_tensors

STATE_VERSION = 1


@dataclass
class TrainState:
    epoch: int
    global_step: int
    beta: Optional[float]
    since_refresh: int
    extra: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    old: Optional[dict[str, torch.Tensor]]
    rng_torch: torch.Tensor
    rng_gen: torch.Tensor
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def save_state(
    path: Path,
    *,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    epoch: int,
    global_step: int,
    fingerprint: str = "",
    beta: Optional[float] = None,
    since_refresh: int = 0,
    old: Optional[torch.nn.Module] = None,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v)
            tensors[f"opt.{idx}.{name}"] = v
    if old is not None:
        tensors.update({f"old.{k}": v for k, v in old.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.gen"] = gen.get_state()
    meta = {"version": STATE_VERSION, "epoch": epoch, "global_step": global_step, "beta": beta,
            "since_refresh": since_refresh, "fingerprint": fingerprint, "extra": extra or {}}
    # the meta travels as a tensor (UTF-8 bytes), so tools that rewrite the tensors keep it
    tensors["meta.json"] = torch.frombuffer(bytearray(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    atomic_save_tensors(path, tensors)


def load_state(path: Path, fingerprint: str = "") -> Optional[TrainState]:
    """The saved state, or None when there is none (or it belongs to another configuration or is
    unreadable: a torn or foreign file means "start over", never a crash or a wrong resume)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(bytes(tensors.pop("meta.json").tolist()).decode("utf-8"))
    except (SafetensorError, OSError, ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if meta.get("version") != STATE_VERSION or meta.get("fingerprint", "") != fingerprint:
        return None
    return TrainState(
        epoch=int(meta["epoch"]), global_step=int(meta["global_step"]), beta=meta.get("beta"),
        since_refresh=int(meta.get("since_refresh", 0)), extra=meta.get("extra", {}),
        model={k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer={k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
        old={k[4:]: v for k, v in tensors.items() if k.startswith("old.")} or None,
        rng_torch=tensors["rng.torch"], rng_gen=tensors["rng.gen"], fingerprint=meta.get("fingerprint", ""),
        meta=meta,
    )


def restore_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Load ``opt.{i}.{name}`` tensors back into ``opt`` (param groups stay as configured)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def restore(state: TrainState, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    model.load_state_dict(state.model)
    restore_optimizer(opt, state.optimizer)
    gen.set_state(state.rng_gen)
    torch.set_rng_state(state.rng_torch)
