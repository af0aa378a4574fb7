"""Evaluate a tuned generator against its base with a reward: the last stage of a recipe and ``diffalign eval``.

With a LoRA the base is the same network with adapters disabled, so no second copy is loaded. Prints the
table, writes ``eval.json``, ``grid.png`` (per prompt: a base row, then a tuned row, same seeds) and
``report.html`` (the same, with histograms and win-rate CIs, in one self-contained page).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from diffalign.config import to_dict
from diffalign.eval import (EvalReport, compare, evaluate_against_base, format_table, sample_grid, score_grid,
                            seeded_noise, write_report)
from diffalign.generators.base import Generator
from diffalign.labelled_grid import write_labelled_grid
from diffalign.media import filmstrip
from diffalign.report_html import ReportSection, SplitResult, write_report_html
from diffalign.sampling import read_prompts
from rewards.reward_spec import spec_label
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
    reports, grids, member_reports = [], [], []
    member_sections: dict[str, list[SplitResult]] = {}
    for split, spec in splits:
        prompts = read_prompts(spec)
        report, base_img, tuned_img, scores = evaluate_against_base(sample_base, sample_tuned, reward, prompts, noise,
                                                                    split, accuracy=accuracy, return_scores=True)
        reports.append(report)
        grids.append((split, prompts, base_img, tuned_img, scores))
        member_reports += _member_reports(reward, split, prompts, base_img, tuned_img, member_sections)
    label = spec_label(cfg.reward)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(reports + member_reports, out_dir,
                 meta={"reward": to_dict(cfg.reward), "seeds": cfg.seeds, "steps": cfg.steps,
                       "guidance": cfg.guidance, "seconds": round(time.time() - t0, 1)})
    for split, prompts, b, t, (sb, st) in grids:
        if b.dim() == 6:  # videos [P, S, F, 3, H, W]: each sample drawn as its frames left to right
            b, t = filmstrip(b), filmstrip(t)
        name = "grid.png" if split == "held-out" else f"grid_{split}.png"
        write_labelled_grid(out_dir / name, prompts, b, t, sb, st, per_prompt=cfg.grid_seeds,
                            title=f"{split}: {label} under each sample")
    report_sections = [ReportSection(label, [SplitResult(rep, prompts, b, t, sb, st) for rep, (
        _split, prompts, b, t, (sb, st)) in zip(reports, grids)])]
    report_sections += [ReportSection(name, splits) for name, splits in member_sections.items()]
    write_report_html(out_dir, report_sections, meta={"reward": label, "seeds": cfg.seeds, "steps": cfg.steps,
                                                      "guidance": cfg.guidance}, per_prompt=cfg.grid_seeds)
    print(format_table(reports + member_reports))
    return reports + member_reports


def _member_reports(reward, split: str, prompts: Sequence[str], base_img: torch.Tensor,
                    tuned_img: torch.Tensor, sections: dict | None = None) -> list[EvalReport]:
    """A weighted reward's members, each reported on its own (split "held-out [hpsv2]") from the same samples:
    a gain in the weighted sum can hide a loss in one of its rewards."""
    named = getattr(reward, "named_members", None)
    if named is None:
        return []
    out = []
    for label, member, _weight in named():
        sb, st = score_grid(member, base_img, prompts), score_grid(member, tuned_img, prompts)
        out.append(compare(f"{split} [{label}]", prompts, base_img, tuned_img, sb, st))
        if sections is not None:  # report.html: one section per member reward
            sections.setdefault(label, []).append(SplitResult(out[-1], prompts, base_img, tuned_img, sb, st))
    return out


def run_eval(base: str, lora: str | Path | None, reward: str | list, checkpoint: str | Path | None, prompts: str,
             seeds: int, steps: int, guidance: float, out: str | Path, device: str = "cpu",
             attention: str = "auto") -> list[EvalReport]:
    """``diffalign eval``: a LoRA against its base (or a model against itself when no LoRA is given). ``reward``:
    a name, ``module:Class`` or a weighted list (each member is also reported on its own)."""
    from diffalign.generators.registry import load_generator

    from diffalign.attention import apply_attention

    gen = load_generator(base, lora=lora, device=device)
    apply_attention(gen, attention, "--attention")  # the base is the same network with adapters off: routed too
    cfg = EvalConfig(prompts=prompts, seeds=seeds, steps=steps, guidance=guidance, reward=reward,
                     reward_checkpoint=None if checkpoint is None else str(checkpoint))
    return evaluate_generator(gen, cfg, Path(out))
