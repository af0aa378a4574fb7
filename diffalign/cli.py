"""`diffalign` command line: parse, hand over to the library. The one composition root.

Every handler imports its library lazily, so ``diffalign --help`` is instant and a subcommand needing an extra
(gradio for ``arena``) fails with a message naming that extra, not at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from diffalign.config import load_yaml

    # A recipe with `kind: reward-model` trains a reward model; every other recipe aligns a generator.
    if load_yaml(args.recipe).get("kind") == "reward-model":
        from rewards.train import run_reward_recipe as run
    else:
        from trainers.recipe import run_recipe as run
    run(args.recipe, overrides=args.set or [])
    return 0


ATTENTION_HELP = ("auto (default): attention through diffalign's dispatcher (measured kernel choice on CUDA, fused "
                  "QKV); off: diffusers' own processors; or a backend to force (sdpa, cudnn, flash, efficient, "
                  "xformers, flash_attn, flash_attn_3, math)")


def _sample(args: argparse.Namespace) -> int:
    from diffalign.sampling import sample_to_folder

    out = sample_to_folder(args.model, args.prompts, args.out, lora=args.lora, num_per_prompt=args.num,
                           steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
                           attention=args.attention)
    print(f"wrote samples to {out}")
    return 0


def _user_reward(args: argparse.Namespace):
    """``--plugins`` imported and ``--reward`` (a name, ``module:Class`` or a YAML list) resolved before any
    work, so a bad plugin or reward fails first and writes nothing."""
    from rewards.plugins import load_plugins
    from rewards.reward_spec import check_reward_spec, parse_reward_arg

    load_plugins(args.plugins or [])
    checkpoint = None if args.checkpoint is None else str(args.checkpoint)
    return check_reward_spec(parse_reward_arg(args.reward), checkpoint, key="--reward")


def _score(args: argparse.Namespace) -> int:
    if args.ray:
        from rewards.ray_scoring import run_score_ray as run
    else:
        from rewards.scoring import run_score as run

    reward = _user_reward(args)
    extra = {} if args.preprocess is None else {"preprocess": args.preprocess}
    out = run(reward, args.checkpoint, args.prompts, args.media, args.out, batch_size=args.batch_size,
              device=args.device, plugins=args.plugins or [], **extra)
    print(f"wrote scores to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainers.evaluate import run_eval

    run_eval(base=args.model, lora=args.lora, reward=_user_reward(args), checkpoint=args.checkpoint,
             prompts=args.prompts, seeds=args.seeds, steps=args.steps, guidance=args.guidance, out=args.out,
             device=args.device, attention=args.attention)
    return 0


def _arena(args: argparse.Namespace) -> int:
    from apps.arena import main as arena_main

    return arena_main(args.config, overrides=args.set or []) or 0


def _annotate(args: argparse.Namespace) -> int:
    from apps.annotate import main as annotate_main

    return annotate_main(args.config, overrides=args.set or []) or 0


def _export_votes(args: argparse.Namespace) -> int:
    from apps.export import export_votes

    out = export_votes(args.db, args.out, exclude_flagged=args.exclude_flagged, criterion=args.criterion)
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in script.parent.glob("*.py") if not p.stem.startswith("_"))
        raise SystemExit(f"no benchmark {args.name!r} in {script.parent} (available: {', '.join(available)})")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Align diffusion and flow-matching generators with "
                                "human preference: train, sample, score, evaluate, collect votes.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="run a training recipe (YAML): sample/label data, train, evaluate")
    t.add_argument("recipe", type=Path, help="recipe YAML, e.g. configs/quickstart.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (dotted path)")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample images from a generator (optionally with a LoRA)")
    s.add_argument("--model", default="toy:shapes-unet", help="local diffusers folder or toy:NAME")
    s.add_argument("--lora", type=Path, help="folder with pytorch_lora_weights.safetensors")
    s.add_argument("--prompts", required=True, help="a prompt, a text file (one per line) or a toy prompt set")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--num", type=int, default=4, help="samples per prompt")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=3.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--attention", default="auto", help=ATTENTION_HELP)
    s.set_defaults(func=_sample)

    r = sub.add_parser("score", help="score media files with a reward model")
    r.add_argument("--reward", required=True, help="registered reward name (see rewards.list_rewards()), a user "
                   "reward module:Class, or a weighted YAML list '[{name: hpsv2, weight: 1}, {name: aesthetic, "
                   "weight: 0.2}]'")
    r.add_argument("--checkpoint", type=Path, help="local checkpoint file or folder of the reward")
    r.add_argument("--prompts", required=True, help="text file with one prompt per media file (or a single prompt)")
    r.add_argument("media", nargs="+", type=Path, help="media files or folders")
    r.add_argument("--out", type=Path, default=Path("scores.csv"), help=".csv or .json")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--device", default="cpu")
    r.add_argument("--ray", action="store_true", help="score with a Ray Data actor pool ([scale] extra)")
    r.add_argument("--preprocess", choices=["fast", "exact"], help="CLIP/BLIP-family rewards: 'fast' (default, "
                   "batched tensors) or 'exact' (the upstream processor's PIL/uint8 path, identical pixels)")
    r.add_argument("--plugins", action="append", metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers rewards before scoring (repeatable)")
    r.set_defaults(func=_score)

    e = sub.add_parser("eval", help="evaluate a generator (and a LoRA) against its base with a reward")
    e.add_argument("--model", default="toy:shapes-unet")
    e.add_argument("--lora", type=Path)
    e.add_argument("--reward", default="shapes-oracle", help="reward name, module:Class or a weighted YAML list "
                   "(each listed reward is also reported on its own)")
    e.add_argument("--plugins", action="append", metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers rewards first (repeatable)")
    e.add_argument("--checkpoint", type=Path)
    e.add_argument("--prompts", default="toy-heldout")
    e.add_argument("--seeds", type=int, default=32)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=3.0)
    e.add_argument("--out", type=Path, default=Path("runs/eval"))
    e.add_argument("--device", default="cpu")
    e.add_argument("--attention", default="auto", help=ATTENTION_HELP)
    e.set_defaults(func=_eval)

    a = sub.add_parser("arena", help="launch the Gradio arena (side-by-side votes, leaderboard) [app extra]")
    a.add_argument("--config", type=Path, default=Path("configs/arena.yaml"))
    a.add_argument("--set", action="append", metavar="KEY=VALUE")
    a.set_defaults(func=_arena)

    n = sub.add_parser("annotate", help="launch the Gradio annotation app [app extra]")
    n.add_argument("--config", type=Path, default=Path("configs/annotate.yaml"))
    n.add_argument("--set", action="append", metavar="KEY=VALUE")
    n.set_defaults(func=_annotate)

    x = sub.add_parser("export-votes", help="export arena/annotation votes as Pick-a-Pic-style preference parquet")
    x.add_argument("--db", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--exclude-flagged", action="store_true", help="drop votes of flagged annotators")
    x.add_argument("--criterion", default="overall", help="which annotation criterion to export")
    x.set_defaults(func=_export_votes)

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    b.add_argument("name", help="e.g. dpo_step, score_throughput, attention, arena_load, efficacy")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    return p


def _version() -> str:
    from diffalign import __version__

    return f"diffalign {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        # Expected failures: one clear line, no traceback, exit 2. (Set DIFFALIGN_DEBUG=1 for the traceback.)
        import os

        if not isinstance(exc, _expected_errors()) or os.environ.get("DIFFALIGN_DEBUG"):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"diffalign {args.command}: error: {message}", file=sys.stderr)
        return 2


def _expected_errors() -> tuple[type, ...]:
    """Bad input and the training loop's own refusals (``TrainingError``: NaN guard, mismatched resume). The loop
    module is looked up, not imported: if it was never imported, none of its errors can have been raised."""
    kinds: list[type] = [FileNotFoundError, ValueError, KeyError, ImportError]
    loop = sys.modules.get("trainers.loop")
    if loop is not None:
        kinds.append(loop.TrainingError)
    return tuple(kinds)


if __name__ == "__main__":
    sys.exit(main())
