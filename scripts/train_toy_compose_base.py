"""Train (or continue training) the compose world's base generator, or evaluate it.

    python scripts/train_toy_compose_base.py --out diffalign/toyworld/weights/compose-unet \
        --state /tmp/compose_base/state.pt --threads 1 --steps 20000 --max-minutes 35 --save-every 250
    python scripts/train_toy_compose_base.py --flow --out diffalign/toyworld/weights/compose-flow \
        --state /tmp/compose_flow/state.pt --threads 1 --steps 6000 --lr 6e-4 --ema-decay 0.998
    python scripts/train_toy_compose_base.py --eval diffalign/toyworld/weights/compose-unet --threads 1

Training: re-running with a larger --steps resumes from the state file (raw + EMA weights, optimiser, data RNG);
pass --fresh to start over. --flow trains the flow base (ComposeFlowPretrainConfig) instead of the UNet base.
Every field of ComposePretrainConfig (or ComposeFlowPretrainConfig) is an option (--help lists them); the logic
lives in diffalign/toyworld/pretrain_compose.py.

--eval FOLDER: the quick quality table of a pipeline folder (or toy:NAME) — oracle reward, accuracy and every
GenEval-style sub-score of compose-oracle on compose-train and compose-heldout, DDIM --eval-steps (20) at CFG
--guidance (3), --seeds (16) fixed noise seeds per prompt. It lives here, not in the package, because the
package (diffalign) may not import the rewards layer above it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.toyworld.pretrain_common import run_script  # noqa: E402
from diffalign.toyworld.pretrain_compose import (ComposeFlowPretrainConfig, ComposePretrainConfig,  # noqa: E402
                                                 pretrain_compose, pretrain_compose_flow)


def evaluate(model: str, *, sets=("compose-train", "compose-heldout"), seeds: int = 16, steps: int = 20,
             guidance: float = 3.0, batch_size: int = 128, per_prompt: bool = False) -> dict:
    """{set: {reward, accuracy, object, colour, position, count, clean, correct_<part>…, reward_std_within,
    tie_rate}}: means over every prompt × seed; position means are over relation prompts only (it does not apply to
    counts); reward_std_within is the mean over prompts of the reward's standard deviation across seeds (how
    much samples of one prompt differ, i.e. how informative preference pairs can be); tie_rate is the share of
    same-prompt sample pairs whose rewards differ by less than 0.01 (a tie for win-rates)."""
    import torch

    from diffalign.eval import sample_grid, seeded_noise
    from diffalign.generators.registry import load_generator
    from diffalign.toyworld.compose import compose_prompt_set, parse_compose_prompt
    from rewards.registry import load_reward

    gen = load_generator(model)
    oracle = load_reward("compose-oracle")
    noise = seeded_noise(gen, range(seeds))
    table = {}
    for name in sets:
        prompts = compose_prompt_set(name)
        start = time.time()
        images = sample_grid(gen, prompts, noise, steps, guidance, batch_size=batch_size)  # [P, S, 3, H, W]
        flat = images.flatten(0, 1)
        flat_prompts = [p for p in prompts for _ in range(seeds)]
        soft = oracle.components(flat, flat_prompts)
        hard = oracle.sub_correct(flat, flat_prompts)
        is_rel = torch.tensor([parse_compose_prompt(p).kind == "relation" for p in flat_prompts])
        row = {"reward": soft["score"].mean().item(), "accuracy": hard["correct"].float().mean().item()}
        for key in ("object", "colour", "position", "count", "clean"):
            values = soft[key][is_rel] if key == "position" else soft[key]
            row[key] = values.mean().item()
        for key in ("object", "colour", "position", "count"):
            values = hard[key][is_rel] if key == "position" else hard[key]
            row[f"correct_{key}"] = values.float().mean().item()
        for kind, mask in (("relation", is_rel), ("count", ~is_rel)):
            if mask.any():
                row[f"{kind}_reward"] = soft["score"][mask].mean().item()
                row[f"{kind}_accuracy"] = hard["correct"][mask].float().mean().item()
        grid = soft["score"].view(len(prompts), seeds)
        row["reward_std_within"] = grid.std(dim=1).mean().item()
        pairs = torch.triu(torch.ones(seeds, seeds, dtype=torch.bool), 1)
        row["tie_rate"] = ((grid.unsqueeze(2) - grid.unsqueeze(1)).abs()[:, pairs] < 0.01).float().mean().item()
        row["sampling_s"] = round(time.time() - start, 1)
        if per_prompt:
            scores = soft["score"].view(len(prompts), seeds).mean(1).tolist()
            acc = hard["correct"].view(len(prompts), seeds).float().mean(1).tolist()
            row["prompts"] = {p: {"reward": round(s, 3), "accuracy": round(a, 3)}
                              for p, s, a in zip(prompts, scores, acc)}
        table[name] = row
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--flow" in argv:
        argv.remove("--flow")
        return run_script(ComposeFlowPretrainConfig, pretrain_compose_flow, __doc__, argv)
    if "--eval" not in argv:
        return run_script(ComposePretrainConfig, pretrain_compose, __doc__, argv)
    ap = argparse.ArgumentParser(description="evaluate a compose base (see the module docstring)")
    ap.add_argument("--eval", required=True, metavar="FOLDER", help="pipeline folder or toy:NAME")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sets", nargs="+", default=["compose-train", "compose-heldout"])
    ap.add_argument("--per-prompt", action="store_true", help="also report each prompt's reward and accuracy")
    ap.add_argument("--json", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    table = evaluate(args.eval, sets=args.sets, seeds=args.seeds, steps=args.eval_steps, guidance=args.guidance,
                     per_prompt=args.per_prompt)
    text = json.dumps(table, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
