"""Where the time goes, for the GPU suite's gaps: profiles that say why a number misses its goal.

1. one SD1.5-size UNet forward, diffusers' processors vs ``install`` (kernels launched, device time, host time);
2. one Diffusion-DPO LoRA step, our loop vs the bare loop (host syncs, device idle, the costliest operations);
3. the HPS-style scorer's batch split into its stages (decode to tensors, host→device copy, resize/normalise, image
   tower, text tower) against the bare image tower.

    python benchmarks/gpu_profile.py --out profile.txt          # on a CUDA machine
    python benchmarks/gpu_profile.py --dry                      # tiny widths on CPU (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_dpo import BareLoop, OurLoop, _sync  # noqa: E402
from benchmarks.gpu_models import build  # noqa: E402
from diffalign.attention import install, uninstall  # noqa: E402

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaMemcpyAsync", "aten::item",
            "aten::_local_scalar_dense")


def _profile(fn, device, steps: int):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    wall = (time.perf_counter() - t0) / steps
    return prof, wall


def summarize(label: str, prof, wall: float, steps: int, device) -> list[str]:
    events = prof.key_averages()
    dev_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    on_device = getattr(torch.autograd, "DeviceType", None)
    kernels = [e for e in events if getattr(e, dev_attr, 0) > 0 and on_device is not None
               and getattr(e, "device_type", None) == on_device.CUDA]
    device_ms = sum(getattr(e, dev_attr) for e in kernels) / 1e3 / steps
    launches = sum(e.count for e in kernels) / steps
    syncs = {k: sum(e.count for e in events if e.key.startswith(k)) / steps for k in SYNC_OPS}
    lines = [f"### {label}",
             f"wall {wall * 1e3:.2f} ms/step; device busy {device_ms:.2f} ms/step "
             f"({100 * device_ms / (wall * 1e3):.0f}% of wall); {launches:.0f} kernels/step; "
             + ", ".join(f"{k.strip()} ×{v:.1f}" for k, v in syncs.items() if v),
             "", "```",
             events.table(sort_by=dev_attr if device.type == "cuda" else "self_cpu_time_total", row_limit=12,
                          max_name_column_width=60),
             "```", ""]
    return lines


def unet_forward(device, dtype, dry, steps) -> list[str]:
    d = build("sd15", device, dtype, dry)
    inputs = d.inputs()
    out = []
    with torch.no_grad():
        prof, wall = _profile(lambda: d.model(**inputs), device, steps)
        out += summarize("SD1.5 UNet forward, diffusers' processors", prof, wall, steps, device)
        install(d.model)
        prof, wall = _profile(lambda: d.model(**inputs), device, steps)
        out += summarize("SD1.5 UNet forward, diffalign install (fused QKV)", prof, wall, steps, device)
        uninstall(d.model)
    return out


def dpo_step(device, dtype, dry, steps) -> list[str]:
    pairs = 2 if dry else 4
    a = OurLoop("sd15", device, dtype, dry, pairs, 16)
    out = []
    prof, wall = _profile(a.step, device, steps)
    out += summarize("DPO step, our loop", prof, wall, steps, device)
    del a
    c = BareLoop("sd15", device, dtype, dry, pairs, 16)
    prof, wall = _profile(c.step, device, steps)
    out += summarize("DPO step, bare loop", prof, wall, steps, device)
    return out


def score_stages(device, dry) -> list[str]:
    import numpy as np
    import open_clip
    from PIL import Image

    from diffalign.media import as_image_batch
    from rewards import load_reward

    arch, n, side, dtype = ("ViT-B-32", 4, 64, torch.float32) if dry else ("ViT-H-14", 128, 512, torch.float16)
    ckpt = Path(tempfile.mkdtemp()) / "HPS.pt"
    torch.save({"state_dict": open_clip.create_model(arch, pretrained=None).state_dict()}, ckpt)
    reward = load_reward("hpsv2", checkpoint=ckpt, arch=arch, batch_size=n, dtype=dtype, device=str(device))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = ["a photo"] * n
    reward.score(images, prompts)

    def timed(fn, reps=5):
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            r = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, r

    stages = {}
    stages["score() whole batch"], _ = timed(lambda: reward.score(images, prompts))
    stages["as_image_batch (PIL -> float tensors, host)"], batch = timed(lambda: as_image_batch(images))
    stages["host -> device copy (float32)"], on_dev = timed(lambda: batch.to(device))
    u8 = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in images])
    stages["host -> device copy (uint8, for contrast)"], _ = timed(lambda: u8.to(device))
    stages["resize + normalise (_pixels)"], pixels = timed(lambda: reward._pixels(on_dev))
    with torch.no_grad():
        stages["image tower"], _ = timed(lambda: reward.tower.image_features(pixels))
        stages["bare encode_image (same pixels, model dtype)"], _ = timed(
            lambda: reward.tower.model.encode_image(pixels.to(dtype)))
    lines = [f"### HPS-style scorer stages, {arch}, {n} images {side}², {str(dtype).replace('torch.', '')}", "",
             "| stage | ms per batch |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in stages.items()]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--parts", default="unet,dpo,score")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = 1 if args.dry else args.steps
    lines = ["# GPU profiles", ""]
    parts = {"unet": lambda: unet_forward(device, dtype, args.dry, steps),
             "dpo": lambda: dpo_step(device, dtype, args.dry, steps),
             "score": lambda: score_stages(device, args.dry)}
    for name in args.parts.split(","):
        lines += parts[name]()
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:  # rewritten after each part: a run stopped at its time limit keeps what it finished
            args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
