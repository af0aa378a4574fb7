"""The efficacy protocol: one way to decide whether a method aligns its generator, the same for every method.

1. **Equal budget.** Every offline method trains the same number of optimizer steps on the *same* synthesised
   data: the base samples K images for each (training prompt, group), the world's oracle scores them, and the
   ranked lists are kept as they are (RankDPO, Flow-RWR, Self-NPO read them) and as best-vs-worst pairs (DPO,
   SmPO, InPO, Flow-DPO). Online methods (PRDP) draw their own samples; they report how many, and how many reward
   calls, beside the offline methods' fixed data.
2. **Three disjoint splits.** Synthesis noise comes from seeds ``SYNTH_SEED0 + i``, one per image. Validation is
   the training prompts under seeds from ``VAL_SEED0`` on, which no synthesised image used. Held-out is the world's
   held-out prompts (combinations never trained on) under seeds from ``HELDOUT_SEED0``. ``SplitPlan.check``
   refuses any overlap.
3. **Selection on validation only.** Each recipe declares a small ``grid`` (≤ 6 points); every point is trained
   and scored on the validation split, the best mean validation reward is chosen, and only that point is ever
   sampled on held-out prompts.
4. **Reported with uncertainty.** Held-out mean reward gain with a bootstrap 95% CI over (prompt, seed), win-rate
   with the tie band of ``diffalign.eval.TIE_BAND``, accuracy before → after, drift, wall time, a labelled grid.

Everything is cached under a work folder keyed by the budget, so a killed run resumes where it stopped: data,
base samples, each grid point's training (from its last checkpoint) and its validation score.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent

SYNTH_SEED0 = 0
VAL_SEED0 = 1_000_000
HELDOUT_SEED0 = 2_000_000


# --- worlds and methods -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """A toy world: its oracle, its prompt splits and its shipped bases (one per generator family)."""

    name: str
    label: str
    reward: str
    train_prompts: str
    heldout_prompts: str
    bases: dict[str, str]


WORLDS: dict[str, World] = {
    "shapes": World("shapes", "shapes (one object)", "shapes-oracle", "toy-train", "toy-heldout",
                    {"unet": "toy:shapes-unet", "flow": "toy:shapes-flow"}),
    "compose": World("compose", "compose (two objects, colour binding, position, count)", "compose-oracle",
                     "compose-train", "compose-heldout", {"unet": "toy:compose-unet", "flow": "toy:compose-flow"}),
    "video": World("video", "shapes video (6 frames, steady motion)", "shapes-video-oracle", "toy-train",
                   "toy-heldout", {"flow": "toy:shapes-video"}),
}


@dataclass(frozen=True)
class Method:
    """How the protocol runs a recipe: its file, which family of base it trains and which data it reads
    ("pairs", "ranked" lists, "online" prompts, or "guidance": nothing trained, a sampler chosen by its scale)."""

    name: str
    recipe: str
    label: str
    family: str
    data: str
    #: it scores samples itself (SmPO's bounds, the online methods): the protocol hands it the world's oracle
    own_reward: bool = False
    #: the row whose validation choice this one reuses under ``--points-from`` (the same recipe, another family)
    same_as: str | None = None


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("dpo", "quickstart.yaml", "Diffusion-DPO", "unet", "pairs"),
    Method("smpo", "smpo.yaml", "SmPO", "unet", "pairs", own_reward=True),
    Method("inpo", "inpo.yaml", "InPO", "unet", "pairs"),
    Method("rankdpo", "rankdpo.yaml", "RankDPO", "unet", "ranked"),
    Method("self_npo", "self_npo.yaml", "Self-NPO + NPO guidance", "unet", "ranked"),
    Method("prdp", "prdp.yaml", "PRDP (online)", "unet", "online", own_reward=True),
    Method("flow_dpo", "flow_dpo.yaml", "Flow-DPO", "flow", "pairs"),
    Method("flow_rwr", "flow_rwr.yaml", "Flow-RWR", "flow", "ranked"),
    Method("flow_dpo_video", "flow_dpo_video.yaml", "Flow-DPO (video)", "flow", "pairs"),
    # the UNet methods on flow-matching bases, through the same generator seam (image and video worlds)
    Method("smpo_flow", "smpo.yaml", "SmPO (flow base)", "flow", "pairs", own_reward=True, same_as="smpo"),
    Method("inpo_flow", "inpo.yaml", "InPO (flow base)", "flow", "pairs", same_as="inpo"),
    Method("self_npo_flow", "self_npo.yaml", "Self-NPO + NPO guidance (flow base)", "flow", "ranked",
           same_as="self_npo"),
    Method("prdp_flow", "prdp.yaml", "PRDP (online, flow base)", "flow", "online", own_reward=True, same_as="prdp"),
    # online RL on flow bases
    Method("flow_grpo", "flow_grpo.yaml", "Flow-GRPO (online)", "flow", "online", own_reward=True),
    Method("diffusion_nft", "diffusion_nft.yaml", "DiffusionNFT (online)", "flow", "online", own_reward=True),
]}

#: inference-time rows: reward guidance, the scale chosen on validation by the oracle like a grid point. The nrg-*
#: rows climb the world's oracle, which then also judges them (an upper bound, not evidence of alignment); the
#: proxy-* rows climb a learned reward fitted to the offline methods' ranked lists (benchmarks/efficacy_guidance.py)
#: and are judged by the oracle. The proxy's gradient is ~6× the oracle's on the shapes base's samples (its scores
#: are standardised), so its grid starts lower and reaches further, into over-optimisation.
GUIDANCE_SCALES = (8.0, 32.0)
PROXY_GUIDANCE_SCALES = (1.0, 4.0, 16.0, 64.0)
GUIDANCE: dict[str, Method] = {m.name: m for m in [
    Method("nrg-unet", "", "Reward guidance with the oracle (NRG form, UNet base)", "unet", "guidance"),
    Method("nrg-flow", "", "Flow-NRG with the oracle (flow base)", "flow", "guidance"),
    Method("proxy-unet", "", "Reward guidance with a learned proxy (UNet base)", "unet", "guidance"),
    Method("proxy-flow", "", "Flow-NRG with a learned proxy (flow base)", "flow", "guidance"),
]}


#: which rows each world's table has (a method needs a base of its family in the world; oracle guidance needs a
#: differentiable oracle, which compose-oracle is not, while the learned proxy is differentiable in every image world)
WORLD_METHODS: dict[str, tuple[str, ...]] = {
    "shapes": ("dpo", "smpo", "inpo", "rankdpo", "self_npo", "prdp", "flow_dpo", "flow_rwr", "nrg-unet", "nrg-flow",
               "smpo_flow", "inpo_flow", "self_npo_flow", "prdp_flow", "flow_grpo", "diffusion_nft", "proxy-unet",
               "proxy-flow"),
    "compose": ("dpo", "smpo", "inpo", "rankdpo", "self_npo", "prdp", "flow_dpo", "flow_rwr", "flow_grpo",
                "diffusion_nft", "proxy-unet", "proxy-flow"),
    "video": ("flow_dpo_video", "smpo_flow", "inpo_flow", "self_npo_flow", "prdp_flow", "flow_grpo", "diffusion_nft"),
}


@dataclass(frozen=True)
class Budget:
    """What every method of a table gets; part of every cache key, so rows of different budgets never mix."""

    steps: int = 200
    samples_per_prompt: int = 8
    groups: int = 8
    min_margin: float = 0.05
    val_seeds: int = 8
    heldout_seeds: int = 32
    eval_steps: int = 20
    guidance: float = 3.0

    def tag(self) -> str:
        return (f"s{self.steps}-k{self.samples_per_prompt}-g{self.groups}-m{self.min_margin:g}-v{self.val_seeds}"
                f"-h{self.heldout_seeds}-e{self.eval_steps}-c{self.guidance:g}")


# --- the splits ---------------------------------------------------------------------------------------------------
@dataclass
class SplitPlan:
    train_prompts: list[str]
    heldout_prompts: list[str]
    #: one seed per synthesised image, prompt-major over (prompt, group, sample)
    synth_seeds: list[int]
    val_seeds: list[int]
    heldout_seeds: list[int]

    def check(self) -> None:
        """Refuse a plan in which validation could see the data's noise or training could see a held-out prompt."""
        leaked = sorted(set(self.heldout_prompts) & set(self.train_prompts))
        if leaked:
            raise ValueError(f"held-out prompts also in training: {leaked[:5]}")
        for name, seeds in (("validation", self.val_seeds), ("held-out", self.heldout_seeds)):
            shared = set(self.synth_seeds) & set(seeds)
            if shared:
                raise ValueError(f"{len(shared)} {name} seeds were used to synthesise training data "
                                 f"(e.g. {sorted(shared)[:3]}); lower the data budget or move {name}'s seeds")
        if set(self.val_seeds) & set(self.heldout_seeds):
            raise ValueError("validation and held-out seeds overlap")


def split_plan(world: World, budget: Budget) -> SplitPlan:
    from diffalign.sampling import read_prompts

    train = read_prompts(world.train_prompts)
    n_images = len(train) * budget.groups * budget.samples_per_prompt
    plan = SplitPlan(train_prompts=train, heldout_prompts=read_prompts(world.heldout_prompts),
                     synth_seeds=list(range(SYNTH_SEED0, SYNTH_SEED0 + n_images)),
                     val_seeds=list(range(VAL_SEED0, VAL_SEED0 + budget.val_seeds)),
                     heldout_seeds=list(range(HELDOUT_SEED0, HELDOUT_SEED0 + budget.heldout_seeds)))
    plan.check()
    return plan


# --- small file helpers -------------------------------------------------------------------------------------------
def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --- data: synthesised once per (world, family, budget) -------------------------------------------------------
@dataclass
class WorldData:
    ranked_dir: Path
    pairs_path: Path
    lists: int
    pairs: int
    images: int
    seconds: float


def pairs_from_lists(lists: Sequence, min_margin: float) -> list:
    """Best vs worst of every ranked list whose score gap exceeds ``min_margin`` (equal scores never pair)."""
    from diffalign.data.preference import PreferencePair

    pairs = []
    for item in lists:
        if item.scores[0] - item.scores[-1] <= min_margin:
            continue
        meta = dict(item.meta)
        for key in ("samples", "noise_seeds"):  # per-item lists: keep the two ends, in pair order
            if isinstance(meta.get(key), list):
                meta[key] = [meta[key][0], meta[key][-1]]
        pairs.append(PreferencePair(prompt=item.prompt, chosen=item.items[0], rejected=item.items[-1], label=1.0,
                                    chosen_score=item.scores[0], rejected_score=item.scores[-1],
                                    id=f"{item.id}:best-worst", meta=meta))
    return pairs


def world_data(world: World, family: str, budget: Budget, plan: SplitPlan, root: Path) -> WorldData:
    folder = root / "data"
    done = read_json(folder / "data.json")
    if done is None:
        with exclusive(folder / "synth.lock"):  # another run synthesising the same data: wait for it
            done = read_json(folder / "data.json")
            if done is None:
                return _synthesise(world, family, budget, plan, folder)
    return WorldData(Path(done["ranked_dir"]), Path(done["pairs_path"]), done["lists"], done["pairs"],
                     done["images"], done["seconds"])


@contextlib.contextmanager
def exclusive(lock: Path, poll_s: float = 5.0):
    """A lock file created atomically; a run that finds it waits (a stale lock from a killed run: delete it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(poll_s)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _synthesise(world: World, family: str, budget: Budget, plan: SplitPlan, folder: Path) -> WorldData:
    from diffalign.data.synth import synthesize
    from diffalign.data.writer import write_pickapic_parquet
    from diffalign.generators.registry import load_generator
    from rewards import load_reward

    t0 = time.time()
    gen = load_generator(world.bases[family])
    reward = load_reward(world.reward)
    prompts = [p for p in plan.train_prompts for _ in range(budget.groups)]
    ranked_dir = folder / "ranked"
    lists = synthesize(gen, reward, prompts, budget.samples_per_prompt, mode="ranked", steps=budget.eval_steps,
                       guidance=budget.guidance, out=ranked_dir, noise_seeds=plan.synth_seeds)
    pairs = pairs_from_lists(lists, budget.min_margin)
    if not pairs:
        raise RuntimeError(f"{world.name}/{family}: no list had a score gap above {budget.min_margin}")
    pairs_path = folder / "pairs.parquet"
    write_pickapic_parquet(pairs, pairs_path)
    data = WorldData(ranked_dir, pairs_path, len(lists), len(pairs), len(prompts) * budget.samples_per_prompt,
                     time.time() - t0)
    write_json(folder / "data.json", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(data).items()})
    return data


# --- evaluation -------------------------------------------------------------------------------------------------
@dataclass
class Split:
    name: str
    prompts: list[str]
    seeds: list[int]


@dataclass
class BaseSamples:
    images: torch.Tensor  # [P, S, 3, H, W] (videos as filmstrips)
    scores: torch.Tensor  # [P, S]
    correct: torch.Tensor | None  # [P, S] 0/1, when the reward offers ``correct``


def _flat(prompts: Sequence[str], s: int) -> list[str]:
    return [q for q in prompts for _ in range(s)]


def _score(reward, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    from diffalign.eval import score_grid

    p, s = images.shape[:2]
    scores = score_grid(reward, images, prompts)
    correct = getattr(reward, "correct", None)
    ok = None if correct is None else correct(images.flatten(0, 1), _flat(prompts, s)).float().view(p, s)
    return scores, ok


def _as_images(media: torch.Tensor) -> torch.Tensor:
    """[P, S, F, 3, H, W] clips -> [P, S, 3, H, F·W] filmstrips (what grids and drift read); images unchanged."""
    if media.dim() == 6:
        from diffalign.media import filmstrip

        return filmstrip(media)
    return media


def sample_split(gen, split: Split, budget: Budget) -> torch.Tensor:
    from diffalign.eval import sample_grid, seeded_noise

    noise = seeded_noise(gen, split.seeds).to(gen.device)
    return sample_grid(gen, split.prompts, noise, budget.eval_steps, budget.guidance)


def base_samples(base_gen, reward, split: Split, budget: Budget, cache: Path) -> BaseSamples:
    """The base's samples on a split: drawn once and reused by every method and grid point."""
    if cache.is_file():
        return BaseSamples(**torch.load(cache, weights_only=True))
    media = sample_split(base_gen, split, budget)
    scores, ok = _score(reward, media, split.prompts)
    out = BaseSamples(images=_as_images(media), scores=scores, correct=ok)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # two runs may draw the same base samples at once
    torch.save(asdict(out), tmp)
    os.replace(tmp, cache)
    return out


def evaluate(tuned_media: torch.Tensor, reward, split: Split, base: BaseSamples,
             grid_path: Path | None = None, grid_title: str = "") -> dict:
    """Every protocol number of tuned vs base on one split (paired by seed), as a JSON-able dict."""
    from diffalign.eval import compare
    from diffalign.labelled_grid import write_labelled_grid

    scores, ok = _score(reward, tuned_media, split.prompts)
    images = _as_images(tuned_media)
    extra = None if ok is None else {"accuracy": (base.correct, ok)}
    report = compare(split.name, split.prompts, base.images, images, base.scores, scores, extra)
    if grid_path is not None:
        write_labelled_grid(grid_path, split.prompts, base.images, images, base.scores, scores, per_prompt=6,
                            title=grid_title)
    row = {"reward_base": report.reward_base, "reward_tuned": report.reward_tuned, "gain": report.reward_gain,
           "gain_ci": list(report.gain_ci), "win_rate": report.win_rate, "wins": report.wins, "ties": report.ties,
           "losses": report.losses, "drift": report.drift, "units": int(scores.numel())}
    if ok is not None:
        row.update(accuracy_base=float(base.correct.mean()), accuracy_tuned=float(ok.mean()))
    row["per_prompt"] = {r.prompt: {"reward_base": r.reward_base, "reward_tuned": r.reward_tuned,
                                    "win_rate": r.win_rate} for r in report.prompts}
    return row


# --- one method: its grid on validation, the chosen point on held-out ------------------------------------------
@dataclass
class Context:
    """Everything a method's run needs that the protocol fixes for it."""

    world: World
    budget: Budget
    plan: SplitPlan
    root: Path  # <workdir>/<world>-<family>/<budget tag>
    data: WorldData | None
    reward: Any
    base_gen: Any
    log: Callable[[str], None] = print
    #: method -> the one grid point to run (the data-scale rows reuse the point the main table chose on validation)
    only_points: dict[str, dict] = field(default_factory=dict)
    #: added to grid file names, so a data-scale or borrowed-choice row never overwrites the main row's grid
    grid_suffix: str = ""
    splits: dict[str, Split] = field(default_factory=dict)

    def __post_init__(self):
        self.splits = {"validation": Split("validation", self.plan.train_prompts, self.plan.val_seeds),
                       "held-out": Split("held-out", self.plan.heldout_prompts, self.plan.heldout_seeds)}

    def base(self, split: str) -> BaseSamples:
        return base_samples(self.base_gen, self.reward, self.splits[split], self.budget,
                            self.root / f"base_{split}.pt")


def recipe_overrides(method: Method, ctx: Context, run_dir: Path) -> list[str]:
    """What the protocol fixes in a recipe, whatever the recipe file says: base, data, budget, no recipe eval."""
    from diffalign.config import load_yaml

    budget, world = ctx.budget, ctx.world
    sets = [f"output_dir={run_dir}", f"model.path={world.bases[method.family]}", "seed=0",
            f"train.max_train_steps={budget.steps}", "train.report_to=none",
            f"train.checkpointing_steps={max(1, budget.steps // 4)}", "train.checkpoints_total_limit=1",
            "train.resume_from_checkpoint=latest", "eval=null"]
    if method.data == "pairs":
        sets += ["data.synth=null", f"data.path={ctx.data.pairs_path}"]
    elif method.data == "ranked":
        sets += ["data.synth=null", f"data.path={ctx.data.ranked_dir}"]
    else:
        sets += [f"data.prompts={world.train_prompts}"]
        if "monitor" in (load_yaml(ROOT / "configs" / method.recipe).get("method") or {}):
            # the online monitor's curve is a validation curve: the world's training prompts under the monitor's
            # own seeds, never held-out prompts (which would otherwise be the recipe's other world's, too)
            sets.append(f"method.monitor.prompts={world.train_prompts}")
    if method.own_reward:  # methods that score with a reward themselves use the world's oracle
        sets.append(f"method.reward={world.reward}")
    return sets


def point_dir(mdir: Path, point: dict) -> Path:
    """A grid point's folder is named by its values, so editing a recipe's grid never mixes up cached points."""
    slug = "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "recipe"
    return mdir / slug.replace("/", "_")


def train_point(method: Method, ctx: Context, point: dict, run_dir: Path) -> dict:
    """Train one grid point (resuming a killed run from its last checkpoint); returns its training summary."""
    from trainers.recipe import point_overrides, run_recipe

    done = read_json(run_dir / "train.json")
    if done is not None:
        return done
    t0 = time.time()
    summary = run_recipe(ROOT / "configs" / method.recipe, recipe_overrides(method, ctx, run_dir)
                         + point_overrides(point))
    out = {"point": point, "train_s": summary["timings"].get("train_s"), "wall_s": time.time() - t0,
           "final_metrics": summary.get("final_metrics", {}), "lora": summary.get("lora"),
           "model": summary.get("model")}
    write_json(run_dir / "train.json", out)
    return out


def tuned_sampler(method: Method, ctx: Context, run_dir: Path):
    """The trained model as a sampler: base + LoRA (or the full model), seen through the method's ``eval_view``
    (Self-NPO is evaluated as NPO guidance's negative branch)."""
    from diffalign.generators.registry import load_generator
    from trainers.methods import build_objective
    from trainers.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    spec = ctx.world.bases[method.family]
    if recipe.model.lora_rank == 0:
        gen, base = load_generator(run_dir / "final"), ctx.base_gen
    else:
        gen, base = load_generator(spec, lora=run_dir / "lora"), None
    view = getattr(build_objective(recipe.method, recipe.data), "eval_view", None)
    return view(gen, base) if view else gen


def guidance_sampler(method: Method, ctx: Context, scale: float):
    """The base guided by the row's reward: the world's oracle (nrg-*) or the learned proxy (proxy-*)."""
    from benchmarks.efficacy_guidance import guide_reward
    from trainers.guidance import RewardGuidance

    return RewardGuidance(ctx.base_gen, guide_reward(method, ctx), scale=scale)


def _climbed(method: Method, ctx: Context, media: torch.Tensor, split_name: str) -> dict | None:
    """For a proxy-guided row: the proxy's own gain on these samples (what guidance climbed), else None."""
    from benchmarks.efficacy_guidance import climbed_gain, guided_with, proxy_reward

    if method.data != "guidance" or guided_with(method.name) != "proxy":
        return None
    split, base = ctx.splits[split_name], ctx.base(split_name)
    oracle_tuned, _ = _score(ctx.reward, media, split.prompts)
    return climbed_gain(proxy_reward(ctx)[0], _as_images(media), base.images, split.prompts, base.scores,
                        oracle_tuned)


def run_method(method: Method, ctx: Context, grid_dir: Path) -> dict:
    """The protocol for one method: every grid point on validation, the best one on held-out. Returns its row."""
    from diffalign.config import load_yaml
    from trainers.recipe import grid_points, load_recipe

    mdir = ctx.root / method.name
    if method.data == "guidance":
        from benchmarks.efficacy_guidance import guided_with

        scales = PROXY_GUIDANCE_SCALES if guided_with(method.name) == "proxy" else GUIDANCE_SCALES
        points = [{"scale": s} for s in scales]
    else:
        recipe_path = ROOT / "configs" / method.recipe
        if "model" not in load_yaml(recipe_path):
            raise ValueError(f"{recipe_path}: no model section")
        points = grid_points(load_recipe(recipe_path))
    if method.name in ctx.only_points:
        points = [ctx.only_points[method.name]]
    val = ctx.base("validation")
    results, wall, online = [], 0.0, {}
    for i, point in enumerate(points):
        run_dir = point_dir(mdir, point)
        scored = read_json(run_dir / "validation.json")
        if scored is None:
            ctx.log(f"[{ctx.world.name}/{method.name}] point {i + 1}/{len(points)}: {point}")
            t0 = time.time()
            if method.data == "guidance":
                sampler, train = guidance_sampler(method, ctx, point["scale"]), {"wall_s": 0.0}
            else:
                train = train_point(method, ctx, point, run_dir)
                sampler = tuned_sampler(method, ctx, run_dir)
            media = sample_split(sampler, ctx.splits["validation"], ctx.budget)
            row = evaluate(media, ctx.reward, ctx.splits["validation"], val)
            scored = {"point": point, "validation": row, "train": train, "wall_s": train["wall_s"] + time.time() - t0}
            climbed = _climbed(method, ctx, media, "validation")
            if climbed is not None:
                scored["climbed"] = climbed
            write_json(run_dir / "validation.json", scored)
        ctx.log(f"[{ctx.world.name}/{method.name}] point {point}: validation reward "
                f"{scored['validation']['reward_tuned']:.4f} (base {scored['validation']['reward_base']:.4f})")
        results.append(scored)
        wall += scored["wall_s"]
        fm = scored["train"].get("final_metrics") or {}
        if "samples_drawn" in fm:
            online = {"samples_drawn": int(fm["samples_drawn"]), "reward_calls": int(fm["reward_calls"])}
    best = max(range(len(results)), key=lambda j: (results[j]["validation"]["reward_tuned"], -j))
    chosen = results[best]
    held = read_json(mdir / "heldout.json")
    grid_path = grid_dir / f"{ctx.world.name}-{method.name}{ctx.grid_suffix}.png"
    # a held-out row made under another section's name (a borrowed choice, then the world's own grid) has its
    # labelled grid under that name: sample again (same seeds) rather than point the table at a missing picture
    if held is None or held.get("point") != chosen["point"] or not grid_path.is_file():
        ctx.log(f"[{ctx.world.name}/{method.name}] chosen on validation: {chosen['point']}; held-out evaluation")
        run_dir = point_dir(mdir, chosen["point"])
        sampler = (guidance_sampler(method, ctx, chosen["point"]["scale"]) if method.data == "guidance"
                   else tuned_sampler(method, ctx, run_dir))
        split = ctx.splits["held-out"]
        t0 = time.time()
        media = sample_split(sampler, split, ctx.budget)
        row = evaluate(media, ctx.reward, split, ctx.base("held-out"), grid_path=grid_path,
                       grid_title=f"{method.label} ({ctx.world.name}), held-out; {ctx.world.reward} under each")
        held = {"point": chosen["point"], "heldout": row, "eval_s": time.time() - t0}
        climbed = _climbed(method, ctx, media, "held-out")
        if climbed is not None:
            held["climbed"] = climbed
        write_json(mdir / "heldout.json", held)
    out = {"world": ctx.world.name, "method": method.name, "label": method.label, "status": "ok",
           "points": [{"point": r["point"], "validation_reward": r["validation"]["reward_tuned"],
                       "validation_gain": r["validation"]["gain"],
                       **({"validation_climbed_gain": r["climbed"]["gain"]} if "climbed" in r else {})}
                      for r in results],
           "chosen": chosen["point"], "validation": chosen["validation"], "heldout": held["heldout"],
           "wall_s": wall + held["eval_s"], "online": online,
           "grid": str(grid_path)}
    if method.data == "guidance":
        out.update(guidance_record(method, ctx, held))
    return out


def guidance_record(method: Method, ctx: Context, held: dict) -> dict:
    """What a guidance row adds to its table row: the reward it climbed, the reward that judged it and, for a
    learned proxy, the proxy's own held-out gain and its pairwise accuracy on ranked lists it never trained on."""
    from benchmarks.efficacy_guidance import guided_with, proxy_reward

    if guided_with(method.name) == "oracle":
        return {"guided_with": f"{ctx.world.reward} (the judge itself)", "judged_by": ctx.world.reward}
    _, fit = proxy_reward(ctx)
    return {"guided_with": "toy-proxy (learned from the ranked lists)", "judged_by": ctx.world.reward,
            "proxy": {"fit": fit, "heldout": held.get("climbed")}}
