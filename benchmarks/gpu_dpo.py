"""Diffusion-DPO LoRA steps at real size on a GPU: our loop vs a bare PyTorch loop, and peak memory.

SD1.5-size UNet (860 M) at 64×64 latents, 4 pairs, bf16 weights with fp32 LoRA under bf16 autocast (as the
reference training scripts run it), rank 16:
  (a) our loop: ``Trainer`` + ``DiffusionDPO``, reference = the policy with adapters off;
  (c) a bare hand-written loop doing the same two forwards, loss, backward, clip and AdamW (goal: (a) ≤ 1.05×);
  peak memory with the adapters-off reference vs a frozen copy of the UNet as reference (goal ≤ 0.6×), each with
  and without gradient checkpointing; the VAE encode a step pays when latents are not cached (512² images).
SDXL-size UNet (2.6 B) at 128×128 latents, 1 pair: step time and peak memory, with and without checkpointing.

Each memory variant runs alone (the previous one freed); its peak is ``max_memory_allocated`` above what was
allocated before it was built. Times: medians of timed steps after warm-up, synchronized; (a) and (c) alternate
step by step so clock and thermal drift hit both alike.

    python benchmarks/gpu_dpo.py                 # on a CUDA machine
    python benchmarks/gpu_dpo.py --dry           # tiny widths on CPU (tests): plumbing only, no memory figures
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.dpo_step import LatentDPO  # noqa: E402
from benchmarks.gpu_models import FULL, TINY, build  # noqa: E402

BETA = 5000.0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _conditioner(name: str, dry: bool):
    from diffalign.generators.text import CLIPConditioner
    from tiny_models import tiny_clip_text, tiny_clip_tokenizer

    cfg = (TINY if dry else FULL)[name]
    tok = tiny_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    if name == "sd15":
        return CLIPConditioner(tok, tiny_clip_text(hidden=cfg["cross_attention_dim"]))
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    first = cfg["cross_attention_dim"] - pooled
    return CLIPConditioner(tok, tiny_clip_text(hidden=first), tok, tiny_clip_text(True, hidden=pooled, proj_dim=pooled),
                           image_size=8 * cfg["sample_size"])


def _latents(shape, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device, dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class OurLoop:
    """(a): the project's Trainer and Diffusion-DPO objective on pre-encoded latents."""

    def __init__(self, name, device, dtype, dry, pairs, rank, reference="adapters_off", checkpointing=False):
        from diffusers import DDPMScheduler

        from diffalign.generators.lora import add_lora
        from diffalign.generators.unet import UNetGenerator
        from trainers.config import TrainConfig
        from trainers.loop import FrozenCopyReference, Trainer

        d = build(name, device, dtype, dry)
        self.params_total = d.params
        if checkpointing:
            d.model.enable_gradient_checkpointing()
        self.gen = UNetGenerator(d.model, DDPMScheduler(), _conditioner(name, dry)).to(device)
        self.lora_params = add_lora(self.gen, rank, targets=LORA_TARGETS)
        shape = self.gen.latent_shape(pairs)
        batch = {"prompt": ["low"] * pairs, "x0_w": _latents(shape, device, dtype, 1),
                 "x0_l": _latents(shape, device, dtype, 2)}
        cfg = TrainConfig(max_train_steps=10 ** 9, train_batch_size=pairs, report_to="none", checkpointing_steps=0,
                          learning_rate=1e-4, lr_scheduler="constant", device=device.type,
                          mixed_precision="bf16" if device.type == "cuda" else "no")
        self.trainer = Trainer(self.gen, LatentDPO(BETA), [batch], cfg, tempfile.mkdtemp(),
                               collate=lambda rows: rows[0])
        if reference == "frozen_copy":
            self.trainer.reference = FrozenCopyReference(self.gen)

    def step(self):
        t = self.trainer
        t.cfg.max_train_steps = t.global_step + 1
        t.train()


class BareLoop:
    """(c): the same step written out by hand: peft LoRA, two forwards, DPO loss, backward, clip, AdamW."""

    def __init__(self, name, device, dtype, dry, pairs, rank):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        d = build(name, device, dtype, dry)
        self.unet, self.device, self.pairs = d.model, device, pairs
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.unet.train()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        cond = _conditioner(name, dry).to(device)
        c = cond(["low"] * pairs)
        self.text = c.hidden.to(dtype).repeat(2, 1, 1)
        self.added = None
        if c.pooled is not None:
            self.added = {"text_embeds": c.pooled.to(dtype).repeat(2, 1),
                          "time_ids": c.extra["time_ids"].to(dtype).expand(2 * pairs, -1)}
        self.ac = DDPMScheduler().alphas_cumprod.to(device)
        cfg = self.unet.config
        shape = (pairs, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.x0 = torch.cat([_latents(shape, device, dtype, 1), _latents(shape, device, dtype, 2)])
        self.dtype = dtype

    def step(self):
        b = self.pairs
        noise = torch.randn_like(self.x0[:b]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (b,), device=self.device).repeat(2)
        a = self.ac[t].view(-1, 1, 1, 1).to(self.dtype)
        xt = a.sqrt() * self.x0 + (1 - a).sqrt() * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            pred = self.unet(xt, t, encoder_hidden_states=self.text, added_cond_kwargs=self.added).sample
            err = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
            with torch.no_grad():
                self.unet.disable_adapters()
                ref = self.unet(xt, t, encoder_hidden_states=self.text, added_cond_kwargs=self.added).sample
                self.unet.enable_adapters()
                ref = (ref.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        mw, ml = err.chunk(2)
        rw, rl = ref.chunk(2)
        loss = -F.logsigmoid(-0.5 * BETA * ((mw - ml) - (rw - rl))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(make, device, steps: int) -> dict:
    """Build one variant alone, run ``steps`` steps; peak bytes above the memory in use before it was built."""
    _free(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner = make()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        runner.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30 if device.type == "cuda" else float("nan")
    del runner
    _free(device)
    return {"peak_gib": peak, "step_s": statistics.median(times[1:] or times)}


def alternate(a, c, device, steps: int, warmup: int) -> dict:
    times = {"a": [], "c": []}
    for i in range(warmup + steps):
        order = (("a", a), ("c", c)) if i % 2 == 0 else (("c", c), ("a", a))
        for name, runner in order:
            _sync(device)
            t0 = time.perf_counter()
            runner.step()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def vae_encode_seconds(device, dtype, dry: bool, images: int, reps: int = 5) -> float:
    """What a step pays to re-encode its images when latents are not cached (the SD VAE, 512² images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    if dry:
        kw = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    with torch.device(device):
        vae = AutoencoderKL(**kw)
    vae = vae.to(dtype).eval()
    side = 32 if dry else 512
    x = torch.rand(images, 3, side, side, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        vae.encode(x)
        out = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            vae.encode(x).latent_dist.sample()
            _sync(device)
            out.append(time.perf_counter() - t0)
    del vae
    _free(device)
    return statistics.median(out)


def run(device, dtype, dry: bool, pairs: int, rank: int, steps: int, warmup: int, sdxl: bool) -> dict:
    res: dict = {"pairs": pairs, "rank": rank, "device": str(device),
                 "precision": "bf16 weights + fp32 LoRA under bf16 autocast" if device.type == "cuda" else
                 "fp32 on CPU"}
    mem_steps = 3
    for ref in ("adapters_off", "frozen_copy"):
        for ckpt in (False, True):
            key = f"sd15_{ref}_{'ckpt' if ckpt else 'nockpt'}"
            res[key] = peak_memory(lambda: OurLoop("sd15", device, dtype, dry, pairs, rank, ref, ckpt), device,
                                   mem_steps)
            print(key, json.dumps(res[key]), flush=True)
    a = OurLoop("sd15", device, dtype, dry, pairs, rank)
    res["unet_params"], res["lora_params"] = a.params_total, a.lora_params
    c = BareLoop("sd15", device, dtype, dry, pairs, rank)
    res["time"] = alternate(a, c, device, steps, warmup)
    print("time", json.dumps(res["time"]), flush=True)
    del a, c
    _free(device)
    res["vae_encode_s"] = vae_encode_seconds(device, dtype, dry, 2 * pairs)
    print("vae", res["vae_encode_s"], flush=True)
    if sdxl:
        for ckpt in (False, True):
            key = f"sdxl_{'ckpt' if ckpt else 'nockpt'}"
            res[key] = peak_memory(lambda: OurLoop("sdxl", device, dtype, dry, 1, rank, "adapters_off", ckpt), device,
                                   mem_steps)
            print(key, json.dumps(res[key]), flush=True)
    return res


def table(r: dict) -> str:
    def gib(key):
        v = r[key]["peak_gib"]
        return "n/a (CPU)" if v != v else f"{v:.2f} GiB"

    t = r["time"]
    lines = [
        f"SD1.5-size UNet ({r['unet_params'] / 1e6:.0f} M), {r['pairs']} pairs, LoRA rank {r['rank']} "
        f"({r['lora_params'] / 1e6:.2f} M trainable), {r['precision']}.",
        "",
        "| variant | step time | peak memory (above what was resident) |",
        "|---|---:|---:|",
        f"| (a) our loop, adapters-off reference | {t['a'] * 1e3:.1f} ms | {gib('sd15_adapters_off_nockpt')} |",
        f"| (c) bare PyTorch loop, same step | {t['c'] * 1e3:.1f} ms | — |",
        f"| (a) + gradient checkpointing | {r['sd15_adapters_off_ckpt']['step_s'] * 1e3:.1f} ms | "
        f"{gib('sd15_adapters_off_ckpt')} |",
        f"| our loop, frozen-copy reference | {r['sd15_frozen_copy_nockpt']['step_s'] * 1e3:.1f} ms | "
        f"{gib('sd15_frozen_copy_nockpt')} |",
        f"| frozen-copy reference + gradient checkpointing | {r['sd15_frozen_copy_ckpt']['step_s'] * 1e3:.1f} ms | "
        f"{gib('sd15_frozen_copy_ckpt')} |",
        f"| VAE re-encode of {2 * r['pairs']} images at 512² (what the latent cache saves per step) | "
        f"{r['vae_encode_s'] * 1e3:.1f} ms | — |",
    ]
    if "sdxl_nockpt" in r:
        lines += [f"| SDXL-size UNet, 1 pair, adapters-off reference | {r['sdxl_nockpt']['step_s'] * 1e3:.1f} ms | "
                  f"{gib('sdxl_nockpt')} |",
                  f"| SDXL-size UNet, 1 pair, + gradient checkpointing | {r['sdxl_ckpt']['step_s'] * 1e3:.1f} ms | "
                  f"{gib('sdxl_ckpt')} |"]
    ratio = t["a"] / t["c"]
    lines += ["", f"- time (a)/(c) = **{ratio:.3f}** (goal ≤ 1.05)"]
    a_mem, f_mem = r["sd15_adapters_off_nockpt"]["peak_gib"], r["sd15_frozen_copy_nockpt"]["peak_gib"]
    if a_mem == a_mem:
        a_ck, f_ck = r["sd15_adapters_off_ckpt"]["peak_gib"], r["sd15_frozen_copy_ckpt"]["peak_gib"]
        lines.append(f"- peak memory adapters-off / frozen copy = **{a_mem / f_mem:.2f}** without checkpointing, "
                     f"**{a_ck / f_ck:.2f}** with it (goal ≤ 0.6)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-sdxl", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dry:
        args.steps, args.warmup, args.pairs = min(args.steps, 2), min(args.warmup, 1), min(args.pairs, 2)
    res = run(device, dtype, args.dry, args.pairs, args.rank, args.steps, args.warmup, not args.no_sdxl)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
