"""Score differences Δ = s(chosen) − s(rejected) of preference pairs, for training and for evaluation, on one
process or split across the data-parallel ranks of an ``accelerate`` launch.

``train: head`` caches each image's frozen features once (no grad, eval mode) and applies only the head per
step; ``train: full`` decodes the images of a step's pairs and scores chosen and rejected in one differentiable
call. Passes over every pair (feature caching, evaluation) are split into contiguous blocks, one per rank, and
gathered back in order, so N processes do 1/N of the work each and all end with the same tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from rewards.train_adapters import RewardAdapter


def chunks(idx: Sequence[int], size: int):
    for s in range(0, len(idx), size):
        yield list(idx[s:s + size])


def decode(pairs, idx: Sequence[int]) -> tuple[list, list, list[str]]:
    chosen, rejected = [], []
    for i in idx:
        try:
            chosen.append(pairs[i].chosen_image())
            rejected.append(pairs[i].rejected_image())
        except Exception as exc:
            raise ValueError(f"preference pair {pairs[i].id or i}: cannot decode its images: {exc}") from exc
    return chosen, rejected, [pairs[i].prompt for i in idx]


def gather_in_order(accelerator: Any, idx: Sequence[int], compute: Callable[[list[int]], Any]) -> Any:
    """``compute`` (rows → a tensor, or a dict of tensors, with one row per index) over ``idx``, split into one
    contiguous block per rank and gathered back in order. Every block is padded to the same length by repeating
    a row (``all_gather`` needs equal shapes, and an empty rank still has to join the collective); padding only
    ever follows the last real row, so the first ``len(idx)`` gathered rows are the answer."""
    n, world, rank = len(idx), accelerator.num_processes, accelerator.process_index
    if world == 1:
        return compute(list(idx))
    if n == 0:
        raise ValueError("nothing to score")
    size = math.ceil(n / world)
    mine = list(idx[rank * size:(rank + 1) * size])
    mine += [mine[-1] if mine else idx[-1]] * (size - len(mine))
    out = accelerator.gather(compute(mine))
    if isinstance(out, dict):
        return {k: v[:n] for k, v in out.items()}
    return out[:n]


class CachedScorer:
    """``train: head``: features of every image computed once, the head applied per step."""

    def __init__(self, adapter: RewardAdapter, pairs, cfg: Any, accelerator: Any):
        from tqdm.auto import tqdm

        self.adapter = adapter
        adapter.reward.eval()
        n = len(pairs)
        with torch.no_grad(), accelerator.autocast(), tqdm(
                total=math.ceil(n / accelerator.num_processes), desc="caching features", unit="pair",
                disable=not (cfg.progress and accelerator.is_local_main_process)) as bar:

            def features(rows: list[int]) -> dict[str, torch.Tensor]:
                parts: dict[str, list[torch.Tensor]] = {}
                for idx in chunks(rows, cfg.eval_batch_size):
                    chosen, rejected, prompts = decode(pairs, idx)
                    feats = adapter.head_features(chosen + rejected, prompts + prompts)
                    k = len(idx)
                    for name, v in feats.items():
                        v = v.float().contiguous()
                        parts.setdefault("c:" + name, []).append(v[:k])
                        parts.setdefault("r:" + name, []).append(v[k:])
                    bar.update(k)
                return {name: torch.cat(v) for name, v in parts.items()}

            self.feats = gather_in_order(accelerator, range(n), features)

    def deltas(self, idx: list[int], *, grad: bool) -> torch.Tensor:
        some = next(iter(self.feats.values()))
        take = torch.as_tensor(idx, dtype=torch.long, device=some.device)
        with torch.set_grad_enabled(grad):
            fc = {k[2:]: v[take] for k, v in self.feats.items() if k.startswith("c:")}
            fr = {k[2:]: v[take] for k, v in self.feats.items() if k.startswith("r:")}
            both = {k: torch.cat([fc[k], fr[k]]) for k in fc}
            s = self.adapter.head_score(both)
        return s[:len(idx)] - s[len(idx):]


class FullScorer:
    """``train: full``: images decoded per step, chosen and rejected scored in one differentiable call."""

    def __init__(self, adapter: RewardAdapter, pairs, cfg: Any, accelerator: Any):
        self.adapter, self.pairs = adapter, pairs

    def deltas(self, idx: list[int], *, grad: bool) -> torch.Tensor:
        chosen, rejected, prompts = decode(self.pairs, idx)
        if grad:
            s = self.adapter.full_score(chosen + rejected, prompts + prompts)
        else:
            with torch.no_grad():
                s = self.adapter.reward.score(chosen + rejected, prompts + prompts)
        return s[:len(idx)] - s[len(idx):]


def all_deltas(scorer, idx: list[int], cfg: Any, accelerator: Any) -> torch.Tensor:
    """Δ of every pair in ``idx`` (eval mode, no grad, float32 on the CPU), the work split across the ranks."""
    if not idx:
        return torch.zeros(0)
    scorer.adapter.reward.eval()

    def compute(rows: list[int]) -> torch.Tensor:
        with accelerator.autocast():
            out = [scorer.deltas(c, grad=False).detach().float() for c in chunks(rows, cfg.eval_batch_size)]
        return torch.cat(out)

    return gather_in_order(accelerator, idx, compute).cpu()
