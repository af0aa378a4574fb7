"""Evaluate a tuned generator against its base with a reward: the last stage of a recipe and ``diffalign eval``.

With a LoRA the base is the same network with adapters disabled, so no second copy is loaded. Prints the
table, writes ``eval.json`` and ``grid.png`` (per prompt: a base row, then a tuned row, same seeds).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from diffalign.eval import EvalReport, evaluate_against_base, format_table, sample_grid, seeded_noise, write_report
from diffalign.generators.base import Generator
from diffalign.labelled_grid import write_labelled_grid
from diffalign.media import filmstrip
from diffalign.sampling import read_prompts
from trainers.config import EvalConfig


def evaluate_generator(gen: Generator, cfg: EvalConfig, out_dir: Path, *, base: Generator | None = None,
                       reward=None, batch_size: int = 128) -> list[EvalReport]:
    """``gen`` with its adapters is the tuned model; ``base`` (default: ``gen`` with adapters off) the baseline."""
    from rewards import load_reward

    t0 = time.time()
    reward = reward or load_reward(cfg.reward, checkpoint=cfg.reward_checkpoint)
    accuracy = getattr(reward, "correct", None)  # per-sample 0/1 "right colour and right shape", when offered
    noise = seeded_noise(gen, range(cfg.seeds)).to(gen.device)

    def sampler(model: Generator, adapters_off: bool):
        def run(prompts: Sequence[str], z: torch.Tensor) -> torch.Tensor:
            if adapters_off:
                with model.adapters_disabled():
                    return sample_grid(model, prompts, z, cfg.steps, cfg.guidance, batch_size)
            return sample_grid(model, prompts, z, cfg.steps, cfg.guidance, batch_size)
        return run

    sample_base = sampler(base, False) if base is not None else sampler(gen, True)
    sample_tuned = sampler(gen, False)
    splits = [("held-out", cfg.prompts)] + ([("train", cfg.train_prompts)] if cfg.train_prompts else [])
    reports, grids = [], []
    for split, spec in splits:
        prompts = read_prompts(spec)
        report, base_img, tuned_img, scores = evaluate_against_base(sample_base, sample_tuned, reward, prompts, noise,
                                                                    split, accuracy=accuracy, return_scores=True)
        reports.append(report)
        grids.append((split, prompts, base_img, tuned_img, scores))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(reports, out_dir, meta={"reward": cfg.reward, "seeds": cfg.seeds, "steps": cfg.steps,
                                         "guidance": cfg.guidance, "seconds": round(time.time() - t0, 1)})
    for split, prompts, b, t, (sb, st) in grids:
        if b.dim() == 6:  # videos [P, S, F, 3, H, W]: each sample drawn as its frames left to right
            b, t = filmstrip(b), filmstrip(t)
        name = "grid.png" if split == "held-out" else f"grid_{split}.png"
        write_labelled_grid(out_dir / name, prompts, b, t, sb, st, per_prompt=cfg.grid_seeds,
                            title=f"{split}: {cfg.reward} under each sample")
    print(format_table(reports))
    return reports


def run_eval(base: str, lora: str | Path | None, reward: str, checkpoint: str | Path | None, prompts: str, seeds: int,
             steps: int, guidance: float, out: str | Path, device: str = "cpu") -> list[EvalReport]:
    """``diffalign eval``: a LoRA against its base (or a model against itself when no LoRA is given)."""
    from diffalign.generators.registry import load_generator

    gen = load_generator(base, lora=lora, device=device)
    cfg = EvalConfig(prompts=prompts, seeds=seeds, steps=steps, guidance=guidance, reward=reward,
                     reward_checkpoint=None if checkpoint is None else str(checkpoint))
    return evaluate_generator(gen, cfg, Path(out))
