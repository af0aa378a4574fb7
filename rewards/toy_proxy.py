"""A tiny learned reward for the toy worlds: what a reward model fitted to preference data looks like there.

Why it exists: guiding a sampler with the very oracle that judges it says nothing about alignment — guidance can
game its own reward. The standard over-optimisation setup (Gao, Schulman & Hilton 2023, "Scaling laws for reward
model overoptimization") guides with a *learned proxy* fitted to the same preference data the offline methods get,
and judges with the oracle. This module is that proxy: small enough to train on CPU in seconds, differentiable so
reward guidance can climb it, and honest about how well it ranks (pairwise accuracy on lists it never saw).

Architecture (any square image size, pixels in [0, 1]):
  image tower  x ⊕ (x, y) coordinate channels → conv 3×3 → SiLU → conv 3×3 stride 2 → SiLU
  prompt       the words' embeddings laid out by position (padded to ``max_words``), flattened, an MLP: word order
               matters ("a red circle left of a blue square" ≠ "a blue square left of a red circle")
  combined     FiLM (feature·(1 + γ(prompt)) + β(prompt)) → conv 3×3 → SiLU → global mean ⊕ max pool → MLP → scalar
The coordinate channels let a globally pooled tower still see *where* things are (the compose world's relations).

Training (``train_toy_proxy``): Bradley–Terry loss −log σ(r_i − r_j) over every ordered pair (i better than j by more
than ``min_margin``) inside each ranked list. A seeded ``heldback`` fraction of the *lists* is never trained on; the
pairwise accuracy on their pairs is the proxy's reported accuracy. Afterwards the scores are standardised (mean 0,
std 1 on the training images; ``compare_scale`` keeps P(a ≻ b) the fitted Bradley–Terry probability).

Checkpoint: a folder with ``model.safetensors`` and ``config.json`` (architecture, vocabulary, standardisation and
the fit report); ``load_reward("toy-proxy", checkpoint=folder)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewards.base import CheckpointError, RewardInputError, RewardModel
from rewards.train_losses import bt_loss

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PAD, UNK = "<pad>", "<unk>"


def toy_vocabulary(prompts: Sequence[str] = ()) -> list[str]:
    """The toy worlds' words (shapes and compose) plus any word of ``prompts``, sorted, after <pad> and <unk>."""
    from diffalign.toyworld.compose import VOCAB as COMPOSE_VOCAB
    from diffalign.toyworld.prompts import VOCAB as SHAPES_VOCAB

    words = set(SHAPES_VOCAB) | set(COMPOSE_VOCAB) | {w for p in prompts for w in p.lower().split()}
    return [PAD, UNK] + sorted(words)


@dataclass
class ToyProxyConfig:
    vocab: list[str] = field(default_factory=toy_vocabulary)
    max_words: int = 8
    word_dim: int = 16
    channels: int = 24
    hidden: int = 32
    #: standardisation of the raw score (set after training): score = (raw − offset) / scale
    offset: float = 0.0
    scale: float = 1.0
    #: what ``train_toy_proxy`` measured (lists, pairs, held-back accuracy, …); empty for an untrained proxy
    fit: dict = field(default_factory=dict)


class ToyProxyReward(RewardModel):
    """A differentiable learned reward r(image, prompt) for the toy worlds (see the module docstring)."""

    name = "toy-proxy"
    modality = "image"
    supports_grad = True
    batch_size = 256

    def __init__(self, config: ToyProxyConfig | None = None):
        super().__init__()
        cfg = self.config = config or ToyProxyConfig()
        if len(set(cfg.vocab)) != len(cfg.vocab) or cfg.vocab[:2] != [PAD, UNK]:
            raise ValueError("toy-proxy: vocab must start with <pad>, <unk> and hold each word once")
        if not cfg.scale > 0:
            raise ValueError(f"toy-proxy: scale must be > 0, got {cfg.scale}")
        self._index = {w: i for i, w in enumerate(cfg.vocab)}
        c, h = cfg.channels, cfg.hidden
        self.words = nn.Embedding(len(cfg.vocab), cfg.word_dim, padding_idx=0)
        self.text = nn.Sequential(nn.Linear(cfg.max_words * cfg.word_dim, h), nn.SiLU(), nn.Linear(h, 2 * c))
        self.conv1 = nn.Conv2d(5, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(2 * c, h), nn.SiLU(), nn.Linear(h, 1))
        self.compare_scale = cfg.scale  # σ(compare_scale·(s_a − s_b)) = σ(raw_a − raw_b), the fitted BT link

    # --- text ----------------------------------------------------------------------------------------------
    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Word ids [B, max_words], padded; unknown words map to <unk>, a longer prompt is an error."""
        rows = []
        for i, prompt in enumerate(prompts):
            words = str(prompt).lower().split()
            if len(words) > self.config.max_words:
                raise RewardInputError(f"toy-proxy, prompt {i}: {len(words)} words, at most "
                                       f"{self.config.max_words} ({prompt!r})")
            ids = [self._index.get(w, 1) for w in words]
            rows.append(ids + [0] * (self.config.max_words - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.words.weight.device)

    # --- scoring -------------------------------------------------------------------------------------------
    def raw(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The unstandardised score [B] (the Bradley–Terry logit scale training works in)."""
        x = images.to(self.conv1.weight.dtype)
        b, _, hgt, wid = x.shape
        ys = torch.linspace(-1, 1, hgt, device=x.device, dtype=x.dtype).view(1, 1, hgt, 1).expand(b, 1, hgt, wid)
        xs = torch.linspace(-1, 1, wid, device=x.device, dtype=x.dtype).view(1, 1, 1, wid).expand(b, 1, hgt, wid)
        f = F.silu(self.conv1(torch.cat([x, xs, ys], dim=1)))
        f = F.silu(self.conv2(f))
        gamma, beta = self.text(self.words(self.tokens(prompts)).flatten(1)).unsqueeze(-1).unsqueeze(-1).chunk(2, 1)
        f = F.silu(self.conv3(f * (1 + gamma) + beta))
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)

    def _score(self, batch: torch.Tensor, prompts: list[str] | None, **cond: Any) -> torch.Tensor:
        if prompts is None:
            raise RewardInputError("toy-proxy scores images against prompts; none were given")
        return (self.raw(batch, prompts) - self.config.offset) / self.config.scale

    # --- files ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict | ToyProxyConfig | None = None) -> "ToyProxyReward":
        """Random weights (tests, or the start of training)."""
        if isinstance(config, dict):
            config = ToyProxyConfig(**config)
        return cls(config)

    @classmethod
    def from_checkpoint(cls, path: Any = None, **kwargs: Any) -> "ToyProxyReward":
        if kwargs:
            raise ValueError(f"reward 'toy-proxy' takes only a checkpoint, got options {sorted(kwargs)}")
        if path is None:
            raise FileNotFoundError("reward 'toy-proxy' needs checkpoint=<a folder written by "
                                    "rewards.toy_proxy.train_toy_proxy (config.json + model.safetensors)>")
        from rewards.clip_checkpoint import check_keys, read_state_dict

        folder = Path(path)
        folder = folder.parent if folder.is_file() else folder
        config_path, weights_path = folder / CONFIG, folder / WEIGHTS
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"reward 'toy-proxy': {p} not found (a checkpoint is a folder with "
                                        f"{CONFIG} and {WEIGHTS}, written by train_toy_proxy)")
        try:
            config = ToyProxyConfig(**json.loads(config_path.read_text()))
            model = cls(config)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"reward 'toy-proxy': {config_path} is not a toy-proxy config: {exc}") from exc
        state = read_state_dict(weights_path, reward="toy-proxy")
        check_keys(model, state, weights_path, reward="toy-proxy")
        model.load_state_dict(state, strict=True)
        return model.eval()

    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` then ``config.json`` (each atomically; the config last, so a folder with a
        config is a finished checkpoint)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{WEIGHTS}.{os.getpid()}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / WEIGHTS)
        tmp = folder / f"{CONFIG}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(self.config), indent=1))
        os.replace(tmp, folder / CONFIG)
        return folder


# --- training --------------------------------------------------------------------------------------------------
def ordered_pairs(scores: torch.Tensor, min_margin: float = 0.0) -> list[tuple[int, int, int]]:
    """(list, better, worse) for every ordered pair inside each list of ``scores`` [L, K] whose gap exceeds
    ``min_margin`` (≥ 0, so equal scores never pair)."""
    out = []
    for i, row in enumerate(scores.tolist()):
        out += [(i, a, b) for a in range(len(row)) for b in range(len(row)) if row[a] - row[b] > min_margin]
    return out


def pair_accuracy(model: ToyProxyReward, images: torch.Tensor, prompts: Sequence[str],
                  pairs: Sequence[tuple[int, int, int]]) -> float:
    """Fraction of (list, better, worse) pairs the model orders right (a tie counts half)."""
    if not pairs:
        return float("nan")
    lists, k = images.shape[:2]
    with torch.no_grad():
        s = model.raw(images.flatten(0, 1), [p for p in prompts for _ in range(k)]).view(lists, k)
    idx = torch.tensor(pairs)
    d = s[idx[:, 0], idx[:, 1]] - s[idx[:, 0], idx[:, 2]]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def heldback_split(prompts: Sequence[str], heldback: float, split: str,
                   gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(held-back list ids, training list ids): a seeded ``heldback`` fraction of the lists, or of the distinct
    prompts (every list of a held-back prompt is held back)."""
    if not 0 <= heldback < 1:
        raise ValueError(f"train_toy_proxy: heldback must lie in [0, 1), got {heldback}")
    if split == "list":
        units = list(range(len(prompts)))
    elif split == "prompt":
        units = sorted(set(prompts))
    else:
        raise ValueError(f"train_toy_proxy: split must be 'list' or 'prompt', got {split!r}")
    order = torch.randperm(len(units), generator=gen).tolist()
    held_units = {units[i] for i in order[:int(round(heldback * len(units))) if len(units) > 1 else 0]}
    key = (lambda i: i) if split == "list" else (lambda i: prompts[i])
    held = [i for i in range(len(prompts)) if key(i) in held_units]
    return held, [i for i in range(len(prompts)) if key(i) not in held_units]


@dataclass
class ProxyFit:
    """What ``train_toy_proxy`` returns: the proxy and how well it ranks lists it never trained on."""

    reward: ToyProxyReward
    report: dict


def train_toy_proxy(images: torch.Tensor, prompts: Sequence[str], scores: torch.Tensor | None = None, *,
                    out: str | Path | None = None, seed: int = 0, min_margin: float = 0.0, heldback: float = 0.2,
                    split: str = "list", steps: int = 300, lists_per_step: int = 16, lr: float = 3e-3,
                    weight_decay: float = 1e-4,
                    config: ToyProxyConfig | None = None,
                    log: Callable[[str], None] | None = None) -> ProxyFit:
    """Fit a ``ToyProxyReward`` to ranked lists with the Bradley–Terry loss.

    ``images`` [L, K, 3, H, W] in [0, 1], each list best first; ``prompts`` one per list; ``scores`` [L, K] (best
    first) decide which ordered pairs count (gap > ``min_margin``); without scores every ordered pair does.
    A seeded ``heldback`` fraction is never trained on — of the lists (``split="list"``) or of the distinct prompts
    with all their lists (``split="prompt"``: does the proxy generalise to prompts it never saw?); the report
    gives the pairwise accuracy on their pairs and on the training pairs. ``out``: a folder to save the checkpoint
    to. About 10 s for 576 lists of 8 images 16×16 on one CPU thread (the cost is ``steps``, not the data size).
    """
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"train_toy_proxy: images must be [lists, K, 3, H, W], got {tuple(images.shape)}")
    n_lists, k = images.shape[:2]
    if len(prompts) != n_lists:
        raise ValueError(f"train_toy_proxy: {n_lists} lists but {len(prompts)} prompts")
    if scores is not None and tuple(scores.shape) != (n_lists, k):
        raise ValueError(f"train_toy_proxy: scores must be [{n_lists}, {k}], got {tuple(scores.shape)}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    held_ids, train_ids = heldback_split(prompts, heldback, split, gen)
    images = images.float()
    if min_margin < 0:
        raise ValueError(f"train_toy_proxy: min_margin must be ≥ 0, got {min_margin}")
    if scores is None:  # strictly ordered lists, best first
        scores, min_margin = torch.arange(k, 0, -1, dtype=torch.float64).expand(n_lists, k), 0.0
    train_pairs = ordered_pairs(scores[train_ids], min_margin)
    held_pairs = ordered_pairs(scores[held_ids], min_margin)
    if not train_pairs:
        raise ValueError(f"train_toy_proxy: no training pair has a score gap above {min_margin}")
    x_train, p_train = images[train_ids], [prompts[i] for i in train_ids]
    x_held, p_held = images[held_ids], [prompts[i] for i in held_ids]

    torch.manual_seed(seed)
    cfg = config or ToyProxyConfig(vocab=toy_vocabulary(prompts))
    model = ToyProxyReward(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    by_list: dict[int, list[tuple[int, int]]] = {}
    for j, a, b in train_pairs:
        by_list.setdefault(j, []).append((a, b))
    usable = sorted(by_list)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        pick = [usable[i] for i in torch.randint(len(usable), (min(lists_per_step, len(usable)),),
                                                 generator=gen).tolist()]
        s = model.raw(x_train[pick].flatten(0, 1), [p_train[j] for j in pick for _ in range(k)]).view(len(pick), k)
        rows = torch.tensor([(r, a, b) for r, j in enumerate(pick) for a, b in by_list[j]])
        loss = bt_loss(s[rows[:, 0], rows[:, 1]] - s[rows[:, 0], rows[:, 2]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"toy-proxy step {step + 1}/{steps}: BT loss {float(loss.detach()):.4f}")
    model.eval()
    with torch.no_grad():
        raw = model.raw(x_train.flatten(0, 1), [p for p in p_train for _ in range(k)])
    cfg.offset, cfg.scale = float(raw.mean()), max(float(raw.std()), 1e-6)
    model.compare_scale = cfg.scale
    cfg.fit = {"lists_train": len(train_ids), "lists_heldback": len(held_ids), "split": f"by {split}",
               "pairs_train": len(train_pairs), "pairs_heldback": len(held_pairs), "min_margin": min_margin,
               "train_accuracy": pair_accuracy(model, x_train, p_train, train_pairs),
               "heldback_accuracy": pair_accuracy(model, x_held, p_held, held_pairs) if held_ids else float("nan"),
               "final_loss": float(loss.detach()), "steps": steps, "seed": seed, "image_size": list(images.shape[-2:]),
               "seconds": time.time() - t0}
    if out is not None:
        model.save(out)
    return ProxyFit(model, dict(cfg.fit))


def train_toy_proxy_from_ranked(ranked_dir: str | Path, out: str | Path, **kwargs: Any) -> ProxyFit:
    """``train_toy_proxy`` on a folder of ranked lists (``index.jsonl``, as ``diffalign.data.synthesize`` writes
    them); every list must hold the same number of same-sized images."""
    from diffalign.data import load_ranked_lists

    data = load_ranked_lists(ranked_dir)
    lists = [data[i] for i in range(len(data))]
    if not lists:
        raise ValueError(f"{ranked_dir}: no ranked lists to train a proxy on")
    sizes = {(len(r.items), *tuple(r.items[0].shape)) for r in lists}
    if len(sizes) != 1:
        raise ValueError(f"{ranked_dir}: lists differ in length or image size ({sorted(sizes)[:3]})")
    images = torch.stack([torch.stack(list(r.items)) for r in lists]).float()  # decoded: float in [0, 1]
    scores = None
    if all(r.scores is not None for r in lists):
        scores = torch.tensor([r.scores for r in lists], dtype=torch.float64)
    return train_toy_proxy(images, [r.prompt for r in lists], scores, out=out, **kwargs)
