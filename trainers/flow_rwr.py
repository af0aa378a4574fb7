"""Flow-RWR (Liu et al., arXiv 2501.13918): reward-weighted flow matching on scored samples, no reference.

The data are the base's own samples with reward scores (ranked lists, flattened: each image is one row); the
loss is the flow-matching error of each sample weighted by w ∝ exp(r/τ), normalised over the batch. With equal
rewards it is plain flow-matching fine-tuning on the samples. It only uses the Generator seam, so it also runs
on ε/v UNets (then it is reward-weighted denoising regression); the recipe targets the flow family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffalign.generators.base import Generator, per_sample_mse
from trainers.config import FlowRWRConfig
from trainers.dpo import training_timesteps
from trainers.losses import rwr_loss
from trainers.rankdpo import FlatSamples, collate_samples, ranked_lists


class FlowRWR:
    collate = staticmethod(collate_samples)

    def __init__(self, cfg: FlowRWRConfig):
        self.temperature = cfg.temperature
        self.timestep_sampling = cfg.timestep_sampling

    def prepare_data(self, recipe, gen: Generator, out_dir: Path):
        samples = FlatSamples(ranked_lists(recipe, gen, out_dir))
        if len(samples) and samples[0]["score"] is None:
            raise ValueError("flow_rwr needs reward scores: the ranked lists in data.path have no 'scores'")
        return samples

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        x0 = gen.encode_media(batch["image"])
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
        t = training_timesteps(gen, b, rng, self.timestep_sampling)
        cond = gen.encode(list(batch["prompt"]))
        err = per_sample_mse(gen.predict(gen.add_noise(x0, noise, t), t, cond), gen.target(x0, noise, t))
        rewards = batch["score"].to(err.device)
        loss = rwr_loss(err, rewards, self.temperature)
        with torch.no_grad():
            w = torch.softmax(rewards / self.temperature, 0) * b
        return loss.mean(), {"model_err": err.mean().detach(), "weight_max": w.max(), "reward_mean": rewards.mean()}
