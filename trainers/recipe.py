"""``diffalign train <recipe.yaml>``: data -> training -> evaluation, each stage resumable.

For AI-feedback recipes (the quickstart) the base generator first samples K images per prompt, a reward labels
them into pairs (as in Diffusion-DPO's AI-feedback variant) and the pairs are written to ``<output_dir>/data``;
a rerun reuses them. Then the shared loop trains, the LoRA (or full model) is saved in diffusers' format, and the
tuned model is evaluated against its base on held-out prompts.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.config import ConfigError, load_config, save_config, to_dict
from diffalign.generators.base import Generator
from trainers.config import Recipe

PAIRS_FILE = "pairs.parquet"


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    return load_config(Recipe, path, overrides)


def grid_points(recipe: Recipe) -> list[dict[str, Any]]:
    """Every point of the recipe's ``grid`` as {dotted key: value}, in declaration order (the product of a
    key -> values grid, or a list of points as written); ``[{}]`` without a grid. A key that names no field of the
    recipe is an error naming it."""
    resolved = to_dict(recipe)
    if isinstance(recipe.grid, list):
        points = [dict(p) for p in recipe.grid]
    else:
        keys = list(recipe.grid)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(recipe.grid[k] for k in keys))]
    for key in dict.fromkeys(k for p in points for k in p):
        node: Any = resolved
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"grid.{key}: no such recipe key")
            node = node[part]
    return points


def point_overrides(point: dict[str, Any]) -> list[str]:
    """A grid point as ``--set`` overrides (values written as JSON, which the YAML override parser reads)."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def prepare_data(recipe: Recipe, gen: Generator, out_dir: Path):
    """The training pairs: read from ``data.path``, or synthesised once and cached under ``out_dir/data``."""
    from diffalign.data.preference import load_preferences

    data = recipe.data
    if data.path is not None and data.lazy:
        from diffalign.data.lazy_parquet import LazyPickapicDataset

        return LazyPickapicDataset(data.path, ties=data.ties, max_bad_fraction=data.max_bad_fraction)
    if data.path is not None:
        return load_preferences(data.path, ties=data.ties, max_bad_fraction=data.max_bad_fraction)
    cached = out_dir / "data" / PAIRS_FILE
    if cached.is_file():
        print(f"reusing AI-feedback pairs from {cached}")
        return load_preferences(cached, ties=data.ties, max_bad_fraction=data.max_bad_fraction)
    if data.synth is None:
        raise ValueError(f"method {recipe.method.name!r} reads preference pairs: give data.path or data.synth")
    from diffalign.data.synth import synthesize
    from diffalign.sampling import read_prompts
    from rewards import load_reward

    s = data.synth
    reward = load_reward(s.reward, checkpoint=s.reward_checkpoint)
    prompts = [p for p in read_prompts(s.prompts) for _ in range(s.groups)]
    t0 = time.time()
    pairs = synthesize(gen, reward, prompts, s.samples_per_prompt, pair_strategy=s.pair_strategy,
                       min_margin=s.min_margin, steps=s.steps, guidance=s.guidance, seed=recipe.seed,
                       batch_size=s.batch_size, out=cached)
    print(f"AI feedback: {len(prompts) * s.samples_per_prompt} samples -> {len(pairs)} pairs "
          f"({time.time() - t0:.0f} s), written to {cached}")
    return load_preferences(cached, ties=data.ties, max_bad_fraction=data.max_bad_fraction)


def load_policy(recipe: Recipe, device: str = "cpu") -> Generator:
    """The recipe's generator as it is trained: frozen parts in ``model.dtype``; a full fine-tune's denoiser in fp32
    and never cast down first (that would lose precision and save nothing). The full fine-tune's evaluation base is
    loaded the same way, so base and tuned differ only by training."""
    from diffalign.generators.registry import load_generator

    full = recipe.model.lora_rank == 0
    gen = load_generator(recipe.model.path, device=device, dtype=recipe.model.dtype,
                         skip_cast=("denoiser",) if full else ())
    if full:
        gen.denoiser.float()  # a full fine-tune trains the denoiser's own weights: they stay fp32
    if recipe.model.text_cache_mb:
        gen.cache_prompts(recipe.model.text_cache_mb)
    return gen


def run_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    from accelerate.utils import set_seed

    from diffalign.attention.option import apply_attention, summary_line, write_attention_log
    from diffalign.generators.lora import add_lora, save_lora
    from trainers.evaluate import evaluate_generator
    from trainers.loop import Trainer
    from trainers.methods import build_objective

    recipe = load_recipe(path, overrides)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "recipe.yaml")
    set_seed(recipe.seed)
    timings: dict[str, float] = {}
    t0 = time.time()
    gen = load_policy(recipe)
    objective = build_objective(recipe.method, recipe.data)
    # methods that read something other than pairs (ranked lists, captioned samples, prompts) bring their own data
    custom_data = getattr(objective, "prepare_data", None)
    dataset = custom_data(recipe, gen, out) if custom_data is not None else prepare_data(recipe, gen, out)
    if recipe.data.resolution is not None:
        from diffalign.data.transforms import configure_geometry

        d = recipe.data
        configure_geometry(dataset, d.resolution, crop=d.crop, hflip=d.hflip, resize=d.resize, seed=recipe.seed,
                           source=str(d.path or out / "data"))
    collate = getattr(objective, "collate", None)
    if recipe.data.cache_latents:
        from diffalign.data.latent_cache import cached_latents, collate_latent_pairs

        dataset, collate = cached_latents(dataset, gen, out / "data", recipe.data.resolution), collate_latent_pairs
    timings["data_s"] = time.time() - t0

    torch.manual_seed(recipe.seed)
    full = recipe.model.lora_rank == 0
    if full:
        gen.denoiser.requires_grad_(True)
    else:
        n = add_lora(gen, recipe.model.lora_rank, recipe.model.lora_alpha, recipe.model.lora_targets or None)
        print(f"LoRA rank {recipe.model.lora_rank}: {n:,} trainable parameters")
    if recipe.model.gradient_checkpointing:
        gen.denoiser.enable_gradient_checkpointing()
    attention = apply_attention(gen, recipe.model.attention, "model.attention")  # after LoRA: adapters stay in
    t1 = time.time()
    trainer = Trainer(gen, objective, dataset, recipe.train, out, seed=recipe.seed, full_finetune=full,
                      run_config=to_dict(recipe), collate=collate)
    result = trainer.train()
    timings["train_s"] = time.time() - t1
    if trainer.accelerator.is_main_process:
        write_attention_log(out, attention, recipe.model.attention)
        print(summary_line(attention, recipe.model.attention))
    summary: dict = {"global_step": result.global_step, "final_metrics": result.metrics}
    cache = getattr(getattr(gen, "conditioner", None), "prompt_cache", None)
    if cache is not None:
        summary["text_cache"] = cache.stats()
        print("prompt cache: {hits} hits, {misses} encodes, {prompts} prompts in {mb:.1f} MB".format(**cache.stats())
              + (" (bypassed: this encoder's rows follow the batch)" if cache.bypassed else ""))
    if result.stopped:  # the LoRA and the evaluation below are of the weights the objective judged
        summary["stopped"] = result.stopped
    if trainer.accelerator.is_main_process:
        if full:
            gen.save_pretrained(out / "final")
            summary["model"] = str(out / "final")
        else:
            summary["lora"] = str(save_lora(gen, out / "lora").parent)
        if recipe.eval is not None:
            t2 = time.time()
            base = load_policy(recipe, device=str(gen.device)) if full else None  # the tuned model's precision
            if base is not None:
                apply_attention(base, recipe.model.attention, "model.attention")
            view = getattr(objective, "eval_view", None)  # inference-time methods (Self-NPO) sample through guidance
            reports = evaluate_generator(view(gen, base) if view else gen, recipe.eval, out, base=base)
            timings["eval_s"] = time.time() - t2
            summary["eval"] = {r.split: {"win_rate": r.win_rate, "reward_base": r.reward_base,
                                         "reward_tuned": r.reward_tuned, "reward_gain": r.reward_gain,
                                         "gain_ci": list(r.gain_ci), "wins": r.wins, "ties": r.ties,
                                         "losses": r.losses, "drift": r.drift} for r in reports}
    timings["total_s"] = time.time() - t0
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    print(f"done in {timings['total_s']:.0f} s (data {timings['data_s']:.0f} s, train {timings['train_s']:.0f} s"
          + (f", eval {timings['eval_s']:.0f} s" if "eval_s" in timings else "") + f"); outputs in {out}")
    return summary
