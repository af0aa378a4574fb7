"""Train (or continue training) the toy shapes world's video base generator (a pixel-space Wan transformer), and
measure what it draws.

    python scripts/train_toy_video_base.py --out diffalign/toyworld/weights/shapes-video --max-minutes 40
    python scripts/train_toy_video_base.py evaluate --model diffalign/toyworld/weights/shapes-video --seeds 32

Re-running with a larger --steps (or a new --max-minutes budget) resumes from the state file (raw + EMA weights,
optimiser, data RNG); pass --fresh to start over. Every field of VideoPretrainConfig is an option (--help lists
them); the logic lives in diffalign/toyworld/pretrain_video.py. ``evaluate`` scores fixed seeds per training and
held-out prompt with shapes-video-oracle; accuracy counts a clip right when every frame has the right colour and
shape (the image oracle's hard check) and the shape moves steadily (motion terms above 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.toyworld.pretrain_common import run_script  # noqa: E402
from diffalign.toyworld.pretrain_video import VideoPretrainConfig, pretrain_video  # noqa: E402


def evaluate(argv: list[str]) -> int:
    import torch

    from diffalign.eval import sample_grid, seeded_noise
    from diffalign.generators.registry import load_generator
    from diffalign.media import filmstrip, make_grid
    from diffalign.toyworld.prompts import HELDOUT_PROMPTS, TRAIN_PROMPTS
    from rewards import load_reward

    ap = argparse.ArgumentParser(description="score a toy video base with shapes-video-oracle")
    ap.add_argument("--model", default="toy:shapes-video", help="pipeline folder or toy:NAME")
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--grid", default=None, help="PNG: per prompt a row of filmstrips (first 4 seeds)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = load_generator(args.model)
    oracle = load_reward("shapes-video-oracle")
    noise = seeded_noise(gen, range(args.seeds))
    result, rows = {}, []
    for split, prompts in (("train", list(TRAIN_PROMPTS)), ("held-out", list(HELDOUT_PROMPTS))):
        videos = sample_grid(gen, prompts, noise, args.steps, args.guidance)  # [P, S, F, 3, H, W]
        rows += [filmstrip(v[:4]) for v in videos]
        flat, frames = videos.flatten(0, 1), videos.shape[2]
        names = [p for p in prompts for _ in range(args.seeds)]
        parts = oracle.components(flat, names)
        frame_ok = oracle.frame_oracle.correct(flat.flatten(0, 1), [p for p in names for _ in range(frames)])
        ok = frame_ok.view(-1, frames).all(dim=1) & (parts["moving"] > 0.5) & (parts["steady"] > 0.5)
        per_prompt = {p: {"reward": round(float(parts["score"].view(len(prompts), -1)[i].mean()), 3),
                          "accuracy": round(float(ok.view(len(prompts), -1)[i].float().mean()), 3)}
                      for i, p in enumerate(prompts)}
        result[split] = {"reward": round(float(parts["score"].mean()), 3), "accuracy": round(float(ok.float().mean()), 3),
                         "frame_accuracy": round(float(frame_ok.float().mean()), 3),
                         "frames_term": round(float(parts["frames"].mean()), 3),
                         "moving": round(float(parts["moving"].mean()), 3),
                         "steady": round(float(parts["steady"].mean()), 3),
                         "speed": round(float(parts["speed"].mean()), 3), "prompts": per_prompt}
    if args.grid:
        make_grid(rows, scale=4).save(args.grid)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate(argv[1:])
    return run_script(VideoPretrainConfig, pretrain_video, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
