"""``diffalign score --ray``: score a large folder with a Ray Data actor pool, one reward model per actor.

Why actors: loading a reward (seconds to a minute for ViT-H) must happen once per worker, not per batch, so
the scorer is a callable class whose ``__init__`` calls ``load_reward`` and whose ``__call__`` scores a batch
through ``rewards.scoring.score_files`` — the single-process code path — so both paths give the same rows
(``path``, ``prompt``, ``score``, ``score_<dim>``…, in input order) and the same CSV/JSON file, written
atomically by ``write_scores``. Inputs are checked on the driver (files exist, prompt count matches) before any
worker starts. Needs the ``[scale]`` extra (``ray[data]``); ``import rewards`` never imports Ray.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from rewards.scoring import expand_media, read_prompts, score_files, write_scores


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library ships in the [data] extra of ray)
    except ImportError as exc:
        raise ImportError("scoring with --ray needs Ray Data: pip install 'diffalign[scale]' "
                          "(or pip install 'ray[data]')") from exc
    return ray


class RewardScorer:
    """The per-actor scorer: one reward loaded in ``__init__``, batches of {idx, path, prompt} scored in
    ``__call__`` (Ray Data's numpy batch format: dict of arrays)."""

    def __init__(self, reward_name: Any, checkpoint: str | None, device: str, has_prompts: bool,
                 reward_kwargs: dict[str, Any], plugins: Sequence[str] = ()):
        from rewards.plugins import load_plugins
        from rewards.registry import load_reward

        load_plugins(plugins)  # each actor is its own process: user rewards are registered there too
        self.reward = load_reward(reward_name, checkpoint=checkpoint, device=device, **reward_kwargs)
        self.has_prompts = has_prompts

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        paths = [str(p) for p in batch["path"]]
        prompts = [str(p) for p in batch["prompt"]] if self.has_prompts else None
        rows = score_files(self.reward, paths, prompts, batch_size=max(1, len(paths)), progress=False)
        out = {"idx": np.asarray(batch["idx"], dtype=np.int64)}
        for key in rows[0]:
            if key.startswith("score"):
                out[key] = np.asarray([r[key] for r in rows], dtype=np.float64)
        return out


def run_score_ray(reward_name: Any, checkpoint: str | Path | None, prompts_file: str | Path | None,
                  media: Sequence[str | Path], out: str | Path, batch_size: int = 32, device: str = "cpu",
                  num_actors: int = 2, *, progress: bool = True, num_cpus_per_actor: float = 1.0,
                  plugins: Sequence[str] = (), **reward_kwargs: Any) -> Path:
    """Like ``rewards.scoring.run_score`` but over ``num_actors`` Ray actors. Uses the running Ray cluster
    (``ray.init`` / ``RAY_ADDRESS``) or starts a local one and shuts it down afterwards. ``device="cuda"``
    gives each actor one GPU. Returns the path of ``out``."""
    from rewards.plugins import load_plugins
    from rewards.registry import spec_modality

    plugins = [str(Path(p).resolve()) if str(p).endswith(".py") else str(p) for p in plugins]
    load_plugins(plugins)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if num_actors < 1:
        raise ValueError(f"num_actors must be ≥ 1, got {num_actors}")
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".json"):  # fail before any worker starts, not after the whole folder is scored
        raise ValueError(f"output {out}: unknown format {suffix or '(no suffix)'}; use .csv or .json")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"reward {reward_name!r}: checkpoint not found: {checkpoint}")
    modality = spec_modality(reward_name)
    paths = expand_media(media, modality)
    prompts = None if prompts_file is None else read_prompts(prompts_file, len(paths))

    ray = _ray()
    started = not ray.is_initialized()
    if started:
        # workers must import this checkout's packages even when they are not pip-installed
        code_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        items = [{"idx": i, "path": str(p), "prompt": "" if prompts is None else prompts[i]}
                 for i, p in enumerate(paths)]
        gpu = str(device).startswith("cuda")
        # enough blocks to keep every actor busy (one block feeds one actor at a time), few enough to stay cheap
        blocks = min(len(items), max(num_actors, min(math.ceil(len(items) / batch_size), 8 * num_actors)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            RewardScorer, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            fn_constructor_kwargs={"reward_name": reward_name,
                                   "checkpoint": None if checkpoint is None else str(checkpoint),
                                   "device": str(device), "has_prompts": prompts is not None,
                                   "reward_kwargs": dict(reward_kwargs), "plugins": list(plugins)},
            num_cpus=num_cpus_per_actor, num_gpus=1 if gpu else 0)
        scored = ds.take_all()
    finally:
        if started:
            ray.shutdown()
    if len(scored) != len(paths):
        raise RuntimeError(f"Ray returned {len(scored)} scores for {len(paths)} files")
    scored.sort(key=lambda r: int(r["idx"]))
    rows = []
    for r in scored:
        p = paths[int(r["idx"])]
        row = {"path": str(p), "prompt": "" if prompts is None else prompts[int(r["idx"])]}
        row.update({k: float(v) for k, v in r.items() if k.startswith("score")})
        rows.append(row)
    return write_scores(rows, out)
