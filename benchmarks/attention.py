"""Attention benchmark: every runnable backend on generator-shaped attention calls, the dispatcher's overhead
over a direct SDPA call, and one denoiser forward with diffusers' processors vs ``diffalign.attention.install``.

    python benchmarks/attention.py                      # CPU: token counts scaled down (table says so)
    python benchmarks/attention.py --dtype bf16         # on a CUDA machine: full shapes, % of device peak

Writes a markdown table (default benchmarks/results/attention.md) with the command and the machine. Forward
FLOPs are 4·B·H·Nq·Nk·D (two GEMMs, reference §7); latency is the median over ``--reps`` timed calls after
warm-up (CUDA: events around each call, synchronized), with the inter-quartile range.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.attention import AttentionBackendError, attention, decisions, explain, install, uninstall  # noqa: E402
from diffalign.attention.autotune import time_call  # noqa: E402
from diffalign.attention.dispatch import BACKENDS, _spec  # noqa: E402

# (label, B, Hq, Hkv, Nq, Nk, D) at the model's real size (one evaluation, no CFG doubling beyond B=2)
SHAPES = [
    ("SD1.5 UNet self-attn 64x64", 2, 8, 8, 4096, 4096, 40),
    ("SD1.5 UNet cross-attn 64x64", 2, 8, 8, 4096, 77, 40),
    ("SDXL UNet self-attn 64x64", 2, 10, 10, 4096, 4096, 64),
    ("SDXL UNet self-attn 32x32", 2, 20, 20, 1024, 1024, 64),
    ("SD3 joint attn 1024px (4096+333)", 2, 24, 24, 4429, 4429, 64),
    ("CogVideoX-5B 49f (17776 tok)", 1, 48, 48, 17776, 17776, 64),
    ("Wan2.1-14B 480p 81f (32760 tok)", 1, 40, 40, 32760, 32760, 128),
    ("AudioLDM2 UNet self-attn (approx.)", 2, 8, 8, 4096, 4096, 40),
    ("Stable Audio Open DiT self-attn", 2, 24, 24, 1025, 1025, 64),
    ("Stable Audio Open cross-attn GQA", 2, 24, 12, 1025, 130, 64),
]

# dense fp16/bf16 tensor-core peaks, TFLOP/s (reference §7)
PEAKS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name or key.replace(" ", "") in name.replace(" ", ""):
            return peak
    if "H100" in name:
        return PEAKS["H100 SXM"]
    return None


def timer(device):
    """Returns f(fn) -> seconds for one call, synchronized on CUDA."""
    return lambda fn: time_call(fn, device.type)


def measure(fn, device, reps, warmup):
    one = timer(device)
    for _ in range(warmup):
        fn()
    times = sorted(one(fn) for _ in range(reps))
    q1, med, q3 = statistics.quantiles(times, n=4) if len(times) >= 4 else (times[0], times[len(times) // 2], times[-1])
    return med, q3 - q1


def scaled_tokens(b, h, n_q, n_k, d, budget_flop):
    """Token counts reduced (same ratio Nq:Nk, Nk kept when it is a text length) so one call is <= budget."""
    flop = 4 * b * h * n_q * n_k * d
    if flop <= budget_flop:
        return n_q, n_k
    if n_k < 512:  # cross-attention to text: keep the text length
        return max(64, int(budget_flop / (4 * b * h * n_k * d))), n_k
    f = math.sqrt(budget_flop / flop)
    return max(64, int(n_q * f)), max(64, int(n_k * f))


def kernel_rows(args, device, dtype):
    rows = []
    for label, b, hq, hk, n_q, n_k, d in SHAPES:
        nq_run, nk_run = (n_q, n_k) if device.type == "cuda" else scaled_tokens(b, hq, n_q, n_k, d, args.cpu_flop)
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, hq, nq_run, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(b, hk, nk_run, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(b, hk, nk_run, d, device=device, dtype=dtype, generator=g)
        flop = 4 * b * hq * nq_run * nk_run * d
        spec = _spec(q, k, v, None, False, 1)
        seen = len(decisions())
        attention(q, k, v)  # the automatic choice (measured on CUDA) is made on the first call of its kind
        auto = decisions()[-1]["backend"] if len(decisions()) > seen else explain(q, k, v)["chosen"]
        golden = F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk).float()
        candidates = ["direct SDPA", "auto"] + [n for n, bk in BACKENDS.items() if bk.why_not(spec) is None]
        for name in candidates:
            score_bytes = b * hq * nq_run * nk_run * q.element_size()
            if name == "math" and score_bytes > args.math_max_bytes:  # MATH materialises the score matrix
                rows.append(("", name, "-", "-", "-", "-", f"skipped: {score_bytes / 1e9:.0f} GB score matrix"))
                continue
            if name == "direct SDPA":
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk)  # noqa: E731
            else:
                backend = None if name == "auto" else name
                fn = lambda backend=backend: attention(q, k, v, backend=backend)  # noqa: E731
            try:
                err = (fn().float() - golden).abs().max().item()
                med, iqr = measure(fn, device, args.reps, args.warmup)
            except (AttentionBackendError, RuntimeError) as e:
                rows.append((label, name, "-", "-", "-", "-", f"failed: {str(e)[:60]}"))
                continue
            tflops = flop / med / 1e12
            peak = peak_tflops(device, dtype)
            rows.append((
                label if name == "direct SDPA" else "",
                name + (f" -> {auto}" if name == "auto" else ""),
                f"{b}x{hq}/{hk}x{nq_run}x{nk_run}x{d}"
                + ("" if (nq_run, nk_run) == (n_q, n_k) else f" (full {n_q}x{n_k})"),
                f"{med * 1e3:.2f} ± {iqr * 1e3:.2f}",
                f"{tflops:.3f}",
                "-" if peak is None else f"{100 * tflops / peak:.1f}%",
                f"max err {err:.1e}",
            ))
    return rows


def overhead_rows(args, device, dtype):
    """Dispatcher (automatic selection) vs direct F.scaled_dot_product_attention, interleaved A/B so load from
    other processes hits both alike; the ratio is the median of per-pair ratios."""
    rows = []
    shapes = [("fixed cost: tiny (1,1,8,8)", (1, 1, 8, 8)), ("small (1,8,256,64)", (1, 8, 256, 64)),
              ("SD-like scaled (2,8,512,40)", (2, 8, 512, 40)), ("SD-like scaled (2,8,1024,40)", (2, 8, 1024, 40))]
    if device.type == "cuda":
        shapes += [("SDXL 64x64 (2,10,4096,64)", (2, 10, 4096, 64)), ("Wan-like (1,40,8192,128)", (1, 40, 8192, 128))]
    for label, shape in shapes:
        q, k, v = (torch.randn(*shape, device=device, dtype=dtype) for _ in range(3))
        one = timer(device)
        direct = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        routed = lambda: attention(q, k, v)  # noqa: E731
        for _ in range(args.warmup):
            direct(), routed()
        ratios, a_times, b_times = [], [], []
        for i in range(args.overhead_reps):
            if i % 2:
                b_t, a_t = one(routed), one(direct)
            else:
                a_t, b_t = one(direct), one(routed)
            a_times.append(a_t)
            b_times.append(b_t)
            ratios.append(b_t / a_t)
        a_med, b_med = statistics.median(a_times), statistics.median(b_times)
        rows.append((label, f"{a_med * 1e3:.3f}", f"{b_med * 1e3:.3f}", f"{(b_med - a_med) * 1e6:+.1f}",
                     f"{100 * (statistics.median(ratios) - 1):+.2f}%", str(args.overhead_reps)))
    return rows


def denoisers(device, dtype):
    from diffusers import CogVideoXTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
    )
    unet_in = dict(sample=torch.randn(2, 4, 32, 32), timestep=torch.tensor([10, 500]),
                   encoder_hidden_states=torch.randn(2, 77, 64))
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    )
    cog_in = dict(hidden_states=torch.randn(2, 3, 4, 16, 16), encoder_hidden_states=torch.randn(2, 16, 16),
                  timestep=torch.tensor([10, 500]))
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    wan_in = dict(hidden_states=torch.randn(2, 16, 3, 16, 16), encoder_hidden_states=torch.randn(2, 16, 32),
                  timestep=torch.tensor([10, 500]))
    out = []
    models = [("tiny SD UNet (32x32 latent, 1024 tokens)", unet, unet_in), ("tiny CogVideoX", cog, cog_in),
              ("tiny Wan", wan, wan_in)]
    for label, model, inputs in models:
        model = model.to(device=device, dtype=dtype).eval()
        inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                  for k, v in inputs.items()}
        out.append((label, model, inputs))
    return out


@torch.no_grad()
def e2e_rows(args, device, dtype):
    rows = []
    for label, model, inputs in denoisers(device, dtype):
        fn = lambda: model(**inputs, return_dict=False)  # noqa: E731
        stock_out = fn()[0].float()
        base, base_iqr = measure(fn, device, args.e2e_reps, args.warmup)
        results = [("diffusers default processors", base, base_iqr, 0.0)]
        for fuse in (False, True):
            install(model, fuse_qkv=fuse)
            err = (fn()[0].float() - stock_out).abs().max().item()
            t, iqr = measure(fn, device, args.e2e_reps, args.warmup)
            uninstall(model)
            results.append((f"diffalign install(fuse_qkv={fuse})", t, iqr, err))
        for i, (name, t, iqr, err) in enumerate(results):
            rows.append((label if i == 0 else "", name, f"{t * 1e3:.2f} ± {iqr * 1e3:.2f}", f"{base / t:.3f}x",
                         f"{err:.1e}"))
    return rows


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--overhead-reps", type=int, default=200)
    p.add_argument("--e2e-reps", type=int, default=15)
    p.add_argument("--cpu-flop", type=float, default=2e9, help="per-call FLOP budget that scales CPU token counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--math-max-bytes", type=float, default=8e9, help="skip MATH when its score matrix is larger")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "attention.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    args.reps = args.reps or (50 if device.type == "cuda" else 10)
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} intra-op threads")
    if device.type == "cuda":
        machine += (f", {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                    f"cuDNN {torch.backends.cudnn.version()}")
    command = "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {machine}\n# {command.strip()}", flush=True)

    kernels = kernel_rows(args, device, dtype)
    print(table(["shape", "backend", "B x Hq/Hkv x Nq x Nk x D", "ms (median ± IQR)", "TFLOP/s", "% peak", "check"],
                kernels), flush=True)
    overhead = overhead_rows(args, device, dtype)
    print(table(["call", "direct SDPA ms", "dispatcher ms", "Δ µs", "overhead", "pairs"], overhead), flush=True)
    e2e = e2e_rows(args, device, dtype)
    print(table(["denoiser", "attention", "forward ms (median ± IQR)", "speed-up", "max |diff| vs stock"], e2e))

    scaled = device.type != "cuda"
    text = "\n".join([
        "# Attention benchmark (diffalign.attention)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine}  ",
        f"dtype {str(dtype).replace('torch.', '')}; median ± IQR over {args.reps} calls after {args.warmup} warm-ups; "
        "TFLOP/s = 4·B·H·Nq·Nk·D / time (forward).",
        "",
        ("**CPU run: token counts are scaled down** (to ≤ {:.0e} FLOP per call; heads and head dims are the "
         "models'); "
         "'% peak' applies to CUDA fp16/bf16 only.".format(args.cpu_flop)) if scaled else
        "Full model token counts; '% peak' is against the dense fp16/bf16 tensor peak of the device.",
        "",
        "## Kernels per shape",
        "",
        table(["shape", "backend", "B x Hq/Hkv x Nq x Nk x D", "ms (median ± IQR)", "TFLOP/s", "% peak", "check"],
              kernels),
        "",
        "'auto -> X' is the dispatcher's automatic choice (X = the backend it ran, measured per call kind on "
        "CUDA; 'sdpa' lets PyTorch pick its kernel). 'check' is the max abs difference from a direct SDPA call on the same inputs.",
        "",
        "## Dispatcher overhead vs calling SDPA directly (goal ≤ 2%)",
        "",
        table(["call", "direct SDPA ms", "dispatcher ms", "Δ µs", "overhead", "pairs"], overhead),
        "",
        "Interleaved A/B timing; Δ µs = difference of medians; overhead = median of per-pair time ratios − 1. "
        "The tiny call shows the dispatcher's fixed per-call cost, the others what it is relative to real work.",
        "",
        "## One denoiser forward: diffusers' default processors vs diffalign.attention.install",
        "",
        table(["denoiser", "attention", "forward ms (median ± IQR)", "speed-up", "max |diff| vs stock"], e2e),
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
