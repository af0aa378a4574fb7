"""The recipe schema: what ``diffalign train <recipe.yaml>`` reads.

Names follow diffusers' training-script flags (learning_rate, gradient_accumulation_steps, checkpointing_steps,
resume_from_checkpoint, mixed_precision, …) so users of those scripts recognise every knob. The ``method``
section is polymorphic: its ``name`` picks the objective and with it the keys that are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign.config import Variant
from rewards.reward_spec import normalize_reward_spec


@dataclass
class ModelConfig:
    #: a local diffusers pipeline folder, or toy:shapes-unet
    path: str = "toy:shapes-unet"
    #: LoRA rank; 0 means a full fine-tune (with a frozen copy as the reference)
    lora_rank: int = 8
    lora_alpha: float | None = None
    #: module names to adapt; empty = the family default (attention projections)
    lora_targets: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    #: weight dtype of the frozen parts (text encoders, VAE, the denoiser's base weights); LoRA weights stay fp32
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: auto = every attention module through diffalign.attention (measured kernel choice on CUDA, fused QKV where
    #: no LoRA wraps the projections); off = diffusers' own processors; or a backend name to force (sdpa, cudnn, …)
    attention: str = "auto"
    #: encoded prompts kept between steps, in megabytes (0: encode every call). The text encoders are frozen, so a
    #: cached prompt is a fresh encode up to float rounding; one SD1.5 prompt is 0.24 MB, one SD3 prompt with T5 ~5 MB
    text_cache_mb: float = 256.0

    def __post_init__(self):
        from diffalign.attention import check_attention_option

        check_attention_option(self.attention, "model.attention")
        if self.text_cache_mb < 0:
            raise ValueError(f"model.text_cache_mb must be >= 0, got {self.text_cache_mb}")


@dataclass
class SynthConfig:
    """AI-feedback data: sample K images per prompt from the base, label them with a reward."""

    prompts: str = "toy-train"
    samples_per_prompt: int = 8
    #: independent groups of K per prompt
    groups: int = 4
    #: a reward name, a user reward "module:Class", or a weighted list [{name, weight, checkpoint, options}];
    #: a list is combined as the weighted mean of per-reward z-scores (the ensemble below, with weights)
    reward: Any = "shapes-oracle"
    reward_checkpoint: str | None = None
    pair_strategy: Literal["best_worst", "all"] = "best_worst"
    min_margin: float = 0.0
    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 128
    #: more rewards for an ensemble (RankDPO's Syn-Pic): with any, ``reward`` and these are combined as
    #: equal-weight z-scores and each member's raw scores are kept for per-reward win counts
    ensemble: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.reward = normalize_reward_spec(self.reward, key="reward")


@dataclass
class DataConfig:
    #: a preference dataset (Pick-a-Pic parquet, HPDv2 json, JSONL folder); or leave empty and use ``synth``
    path: str | None = None
    synth: SynthConfig | None = None
    ties: Literal["drop", "keep"] = "drop"
    max_bad_fraction: float = 0.05
    #: probability of blanking the shared caption of a pair (both images), as Diffusion-DPO does
    caption_dropout: float = 0.0
    #: prompts only (a toy prompt set name or a text file), for online methods that sample their own data (PRDP)
    prompts: str | None = None
    #: train at this square size: shorter side resized to it, then cropped (Diffusion-DPO's transforms); null keeps
    #: the file's size, and then every image of the file must share one size
    resolution: int | None = None
    crop: Literal["center", "random"] = "center"
    #: flip both images of a pair together with probability 0.5
    hflip: bool = False
    #: false: the file's images must already be resolution² (a mismatch is an error naming the file and row)
    resize: bool = True
    #: Pick-a-Pic parquet read on demand (row groups, an index in memory) instead of held in memory: for files
    #: larger than RAM; images are then checked when their row is read
    lazy: bool = False
    #: encode each preference image once with the VAE and keep the latents beside the pairs (needs ``resolution``
    #: and neither random crop nor flip, which would change the latents every epoch)
    cache_latents: bool = False

    def __post_init__(self):
        if self.resolution is not None and (isinstance(self.resolution, bool) or self.resolution < 1):
            raise ValueError(f"data.resolution must be a whole number ≥ 1 or null, got {self.resolution!r}")
        if self.cache_latents and (self.crop == "random" or self.hflip):
            raise ValueError("data.cache_latents: cached latents are fixed, so use crop: center and hflip: false "
                             "with it")


@dataclass
class TrainConfig:
    max_train_steps: int = 200
    #: pairs per optimizer step per process, before accumulation
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = 2
    #: null, "latest", or a checkpoint folder
    resume_from_checkpoint: str | None = None
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_steps: int = 10
    #: stop after this many non-finite losses/gradients in a row
    max_nonfinite_steps: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: DataLoader worker processes that read and decode the next micro-batches while the step runs (0 = decode on
    #: the training process); the batches are the same either way
    dataloader_num_workers: int = 0

    def __post_init__(self):
        """Sizes and step counts checked when the recipe loads: a zero batch fails deep in the loss, and a
        negative step count "finishes" at once with an untrained LoRA and exit code 0."""
        for key in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "max_nonfinite_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{key} must be a whole number ≥ 1, got {value!r}")
        for key in ("lr_warmup_steps", "checkpointing_steps", "dataloader_num_workers"):  # 0 = none / never
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{key} must be a whole number ≥ 0, got {value!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"train.checkpoints_total_limit must be ≥ 1 or null, got {self.checkpoints_total_limit}")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):
            raise ValueError(f"train.learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"train.max_grad_norm must be ≥ 0 (0 = no clipping), got {self.max_grad_norm!r}")


@dataclass
class EvalConfig:
    prompts: str = "toy-heldout"
    seeds: int = 32
    steps: int = 20
    guidance: float = 3.0
    #: a reward name, "module:Class", or a weighted list [{name, weight, checkpoint, options}]: the headline is
    #: the weighted sum, and every listed reward is also reported on its own
    reward: Any = "shapes-oracle"
    reward_checkpoint: str | None = None
    #: also report the training prompts (in-distribution)
    train_prompts: str | None = None
    #: samples per prompt shown in the PNG grid
    grid_seeds: int = 8

    def __post_init__(self):
        self.reward = normalize_reward_spec(self.reward, key="reward")


@dataclass
class MethodConfig(Variant):
    """Base of every objective's section; ``name`` selects it."""


@MethodConfig.register("dpo")
@dataclass
class DPOConfig(MethodConfig):
    #: β on the mean-error scale (trainers.md §1: 5000 for SD1.5/SDXL ≙ diffusers' β′ = 2500)
    beta: float = 5000.0
    #: one ε per pair, as the official code (winner and loser then differ only in content); false draws
    #: separate ε^w, ε^l as the paper's Eq. 14 writes — an ablation: the toy world loses its gain with it
    shared_noise: bool = True


@dataclass
class RewardSource:
    """The reward a method scores with itself (SmPO's p, PRDP's online rewards): a registered name, a user
    reward "module:Class", or a weighted list [{name, weight, checkpoint, options}] (scored as Σ wᵢ·rᵢ)."""

    reward: Any = "shapes-oracle"
    reward_checkpoint: str | None = None

    def __post_init__(self):
        self.reward = normalize_reward_spec(self.reward, key="reward")


@dataclass
class InversionSettings:
    """How InPO-style methods invert an image to its noisy latent (grid size; noise after each step as a fraction
    of the forward transition's std — InPO's official code uses 0.1, SmPO's ReNoise inversion none)."""

    inversion_steps: int = 10
    inversion_eta: float = 0.0
    #: "ddim": approximate inversion of each image (the papers'); "sampler_path": the base's own sampling path of
    #: each image, exact for data synthesised with noise seeds (trainers/sampler_path.py says why); "forward": no
    #: inversion, Diffusion-DPO's fresh forward noise shared by the pair (the papers' ablation baseline, which
    #: isolates what the inversion itself contributes)
    inversion: Literal["ddim", "sampler_path", "forward"] = "ddim"
    #: which timestep a DDIM-inverted x̃ is trained at. "sampled" (the papers' official code): x̃ from the last grid
    #: point ≤ t is used at the sampled t itself, with ε̃ reparametrised at t (still exact: add_noise(x0, ε̃, t) = x̃),
    #: so t stays continuous while x̃ is a little less noisy than t says; "grid": the grid point x̃ was inverted to,
    #: so the model is told x̃'s own noise level but t takes only ``inversion_steps`` values — tried here first, it
    #: halved InPO's validation gain in the toy world (+0.027 against +0.054; benchmarks/results/efficacy_findings.md)
    inverted_timestep: Literal["grid", "sampled"] = "sampled"
    #: "own": each image keeps its own inverted noise ε̃ (the papers'); "winner": the loser is noised with the
    #: winner's ε̃ too, so the pair differs only in content as in Diffusion-DPO's shared ε — the toy world's DPO
    #: loses its gain without that sharing (benchmarks/results/efficacy_ablations.md)
    pair_noise: Literal["own", "winner"] = "own"


@MethodConfig.register("smpo")
@dataclass
class SmPOConfig(RewardSource, InversionSettings, MethodConfig):
    #: β on the mean-error scale (trainers.md §3: 2000 for SD1.5, 5000 for SDXL)
    beta: float = 2000.0
    #: γ of the smoothed preference; the logit is scaled by γ(2p − 1) (hard-coded 10 in the paper's code)
    gamma: float = 10.0
    #: global min/max of the reward's scores used to normalise them (PickScore raw cosine on Pick-a-Pic v2:
    #: 0.11543526500463486 / 0.28201571106910706; the toy oracle lives in [0, 1])
    score_min: float = 0.0
    score_max: float = 1.0
    #: inverse grid size (5 for SD1.5, 10 for SDXL) and ReNoise refinements per grid point
    inversion_steps: int = 5
    renoise_iters: int = 1


@MethodConfig.register("inpo")
@dataclass
class InPOConfig(InversionSettings, MethodConfig):
    #: β on the mean-error scale (trainers.md §2: 2000 for SD1.5, 5000 for SDXL)
    beta: float = 2000.0
    #: the paper's grid of 10 (SD: 1, 101, …, 901) and the official code's inversion noise 0.1
    inversion_steps: int = 10
    inversion_eta: float = 0.1


@MethodConfig.register("rankdpo")
@dataclass
class RankDPOConfig(MethodConfig):
    #: β in Diffusion-DPO's convention (z = −β/2·…); the ranked loss uses β/2 so k = 2 reduces to DPO × Δ
    beta: float = 5000.0


@MethodConfig.register("self_npo")
@dataclass
class SelfNPOConfig(MethodConfig):
    #: DDIM grid the teacher's truncated solver walks (25 steps = stride 40 of 1000)
    ddim_steps: int = 25
    #: teacher DDIM steps per sample (≤ 5 in the paper)
    solver_steps: int = 5
    #: the EMA teacher's decay per optimizer step (the paper's, for its 1,000 steps; see trainers/self_npo.py)
    ema_decay: float = 0.999
    #: pseudo-Huber constant c
    huber_c: float = 0.001


@dataclass
class OnlineMonitorConfig:
    """The reward-hacking monitor of online methods (trainers/online_monitor.py): every ``every`` optimizer steps it
    samples a fixed validation set (``prompts`` × ``seeds``, fixed noise, ODE sampler) with the policy, scores it
    with the training reward and each ``heldout`` reward, measures the drift from the reference's samples of the
    same noise, logs all to TensorBoard (<output_dir>/logs/monitor) and monitor.jsonl, and acts (``action``) when
    the training reward has risen since the first evaluation while a held-out reward fell by more than
    ``max_heldout_drop`` or the drift passed ``max_drift``, ``patience`` evaluations in a row."""

    every: int = 20
    prompts: str = "toy-heldout"
    seeds: int = 2
    steps: int = 10
    guidance: float = 3.0
    #: held-out rewards: each a reward name, "module:Class" or a weighted list [{name, weight}]
    heldout: list[Any] = field(default_factory=list)
    #: bound on the fall of any held-out reward below its first evaluation (its own units); null = not checked
    max_heldout_drop: float | None = 0.05
    #: bound on the drift: mean squared difference of policy and reference samples in [0, 1]; null = not checked
    max_drift: float | None = None
    #: the training reward must have risen by more than this since the first evaluation to call it hacking
    min_train_gain: float = 0.0
    action: Literal["warn", "stop"] = "stop"
    patience: int = 1
    #: samples per sampler call of an evaluation (the validation set is prompts × seeds)
    batch_size: int = 16

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"monitor.every must be a whole number ≥ 1, got {self.every!r}")
        if self.seeds < 1 or self.steps < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("monitor.seeds, monitor.steps, monitor.patience and monitor.batch_size must be ≥ 1")
        for key in ("max_heldout_drop", "max_drift"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ValueError(f"monitor.{key} must be ≥ 0 or null, got {value!r}")
        self.heldout = [normalize_reward_spec(h, key=f"monitor.heldout[{i}]") for i, h in enumerate(self.heldout)]


@dataclass
class OnlineMonitoring:
    """Online methods' optional ``monitor`` section (null: no monitoring)."""

    monitor: OnlineMonitorConfig | None = None


@MethodConfig.register("prdp")
@dataclass
class PRDPConfig(RewardSource, OnlineMonitoring, MethodConfig):
    #: KL weight: the regression target is (r_a − r_b)/β. Log-probs are per-dimension means (the sampler's
    #: DDPO/flow_grpo convention), so β is on that scale, not the paper's summed one
    beta: float = 1.0
    #: proximal clip ε on each per-step log-ratio, centred on θ_old
    clip: float = 1.0e-3
    #: trajectories per prompt (pairs are all pairs within a prompt)
    samples_per_prompt: int = 4
    #: gradient steps on each sampled batch before resampling (PRDP's K)
    inner_steps: int = 4
    #: sampler: DDIM/SDE steps, η (> 0: stochastic steps with log-densities) and CFG scale
    sample_steps: int = 10
    eta: float = 1.0
    guidance: float = 3.0
    #: fraction of the stochastic steps whose log-ratios get a gradient per update (the sum is rescaled)
    timestep_fraction: float = 1.0
    #: mixed sampling: indices of the only steps drawn with noise η (the rest are deterministic DDIM/ODE steps with
    #: no density), so r̂ sums those steps alone; empty: every step that has noise (the paper)
    sde_steps: list[int] = field(default_factory=list)


@MethodConfig.register("flow_grpo")
@dataclass
class FlowGRPOConfig(RewardSource, OnlineMonitoring, MethodConfig):
    """Flow-GRPO (Liu et al. 2025) / DanceGRPO (Xue et al. 2025) on the flow family's SDE sampler."""

    #: G: samples per prompt, the group the advantages are normalised in
    samples_per_prompt: int = 4
    #: Euler/SDE steps of a training rollout (Flow-GRPO's "denoising reduction": 10 for training)
    sample_steps: int = 10
    #: noise level η of the SDE and its schedule: "flow_grpo" s = η·√(σ/(1 − σ)) (0.7: the noise level Flow-GRPO's
    #: ablation settles on) or "dance_grpo" s = η (constant)
    eta: float = 0.7
    sde_schedule: Literal["flow_grpo", "dance_grpo"] = "flow_grpo"
    guidance: float = 3.0
    #: PPO clip ε on the per-step ratio (Flow-GRPO's image configs: 1e-4)
    clip_range: float = 1.0e-4
    #: advantage guard (std + eps) and bound |A| ≤ adv_clip (Flow-GRPO: 5)
    adv_eps: float = 1.0e-4
    adv_clip: float = 5.0
    #: the std advantages are divided by: "group" (the G samples of the prompt, the paper's Eq. 4) or "batch"
    #: (every sample of the round, still centred per prompt: the official code's global_std, set in its GenEval,
    #: PickScore and OCR configs)
    adv_std: Literal["group", "batch"] = "group"
    #: weight of the closed-form KL to the reference (adapter-off) step Gaussians; 0 = off (Flow-GRPO: 0.04)
    kl_beta: float = 0.0
    #: loss calls on each sampled round before the next is drawn
    inner_steps: int = 1
    #: fraction of the SDE steps trained per loss call (Flow-GRPO's timestep_fraction)
    timestep_fraction: float = 1.0
    #: mixed ODE/SDE sampling (MixGRPO / TempFlow-GRPO): indices of the steps that are SDE (empty: all of them);
    #: the others are ODE and not trained
    sde_steps: list[int] = field(default_factory=list)
    #: > 0: each round draws this many SDE steps at random among ``sde_steps`` (or all steps)
    sde_random: int = 0


@MethodConfig.register("diffusion_nft")
@dataclass
class DiffusionNFTConfig(RewardSource, OnlineMonitoring, MethodConfig):
    """DiffusionNFT (Zheng et al. 2025): forward-process training on the sampler's clean samples."""

    samples_per_prompt: int = 4
    #: the rollout sampler: any solver of the seam (η = 0: the ODE, the paper's choice) and its CFG scale
    sample_steps: int = 10
    eta: float = 0.0
    guidance: float = 1.0
    #: β of the implicit policies v± (the paper's guidance strength)
    beta: float = 1.0
    #: advantage clip c of the optimality map r = ½ + ½·clip(A, −c, c)/c
    adv_clip: float = 1.0
    #: the σ range training timesteps are drawn from (uniformly) and how many per sample per loss call
    t_min: float = 0.0
    t_max: float = 1.0
    timesteps_per_sample: int = 1
    #: loss calls on each sampled round before the next is drawn
    inner_steps: int = 1
    #: the old (sampling) policy: θ_old ← d·θ_old + (1 − d)·θ at each round, d = min(ema_max, ema_rate·round)
    #: (0 = sample with the current weights)
    ema_rate: float = 0.001
    ema_max: float = 0.5


@dataclass
class FlowTimesteps:
    """Which σ the flow objectives train at. "logit_normal": the generator's own training density (SD3's
    logit-normal, flow_grpo's DPO choice; with SD3.5's shift 3 its mass sits at high noise). "uniform": σ ~ U(0, 1),
    every step of an evenly spaced Euler sampler equally, as Diffusion-DPO's t ~ U{0..999} does; for an unshifted
    base (the toy flow base) logit-normal(0, 1) puts only 8% of the mass above σ = 0.8, where a sample's layout,
    shape and colour are decided."""

    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"


@MethodConfig.register("flow_dpo")
@dataclass
class FlowDPOConfig(FlowTimesteps, MethodConfig):
    #: constant β on the velocity-MSE scale (flow_grpo's SD3.5 default 100; FLUX LoRA wants ~2000)
    beta: float = 100.0


@MethodConfig.register("flow_rwr")
@dataclass
class FlowRWRConfig(FlowTimesteps, MethodConfig):
    #: w ∝ exp(r/τ), normalised over the batch; τ = 1 is the paper's exp(r)
    temperature: float = 1.0


#: methods whose pairs may come from ``data.cache_latents`` (they take x0 from the batch when it holds latents)
LATENT_CACHE_METHODS = ("dpo", "flow_dpo")

#: most points a recipe's grid may have: selection on a small validation split over many points would overfit it
MAX_GRID_POINTS = 6


@dataclass
class Recipe:
    method: MethodConfig
    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig | None = None
    seed: int = 0
    #: the small hyper-parameter grid the efficacy protocol searches for this recipe: dotted key -> values (their
    #: product), or a list of points ({dotted key: value} each) when settings move together (e.g. group size and
    #: prompts per step at an equal sample budget); at most MAX_GRID_POINTS points. The best point by *validation*
    #: reward is the one reported. ``diffalign train`` ignores it and trains the values written above.
    grid: dict[str, list[Any]] | list[dict[str, Any]] = field(default_factory=dict)
    #: modules (my_pkg.my_rewards) or .py files imported before the run, so the rewards they register
    #: (``@register_reward``) can be named in this recipe
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._check_rewards()
        if isinstance(self.grid, list):
            if not self.grid or any(not isinstance(p, dict) or not p for p in self.grid):
                raise ValueError("grid: a list of points must hold non-empty {dotted key: value} mappings")
            n = len(self.grid)
        else:
            n = 1
            for key, values in self.grid.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"grid.{key}: give a non-empty list of values")
                n *= len(values)
        if n > MAX_GRID_POINTS:
            raise ValueError(f"grid: {n} points; the efficacy protocol allows at most {MAX_GRID_POINTS} per recipe")
        if self.model.dtype != "fp32" and self.model.lora_rank == 0 and self.train.mixed_precision == "no":
            raise ValueError(f"model.dtype: {self.model.dtype} frozen parts feed a full fine-tune's fp32 denoiser; "
                             "set train.mixed_precision (bf16 or fp16) so autocast joins them")
        if self.data.cache_latents and self.method.name not in LATENT_CACHE_METHODS:
            raise ValueError(f"data.cache_latents: method {self.method.name!r} encodes its own images; the cache "
                             f"serves {', '.join(LATENT_CACHE_METHODS)}")
        given = [k for k in ("path", "synth", "prompts") if getattr(self.data, k) is not None]
        if not given:
            raise ValueError("data: give either 'path' (a preference dataset), 'synth' (AI-feedback sampling) or "
                             "'prompts' (online methods)")
        if len(given) > 1:
            raise ValueError(f"data: {' and '.join(repr(k) for k in given)} are exclusive")

    def _check_rewards(self) -> None:
        """Import the plugins and resolve every reward the recipe names, so a bad plugin, ``module:Class`` or
        name fails at load time — before anything is sampled, trained or written."""
        from rewards.plugins import load_plugins
        from rewards.reward_spec import check_reward_spec

        try:
            load_plugins(self.plugins)
        except ValueError as exc:
            raise ValueError(f"plugins: {exc}") from exc
        named: list[tuple[str, Any, str | None]] = []
        if self.data.synth is not None:
            s = self.data.synth
            named.append(("data.synth.reward", s.reward, s.reward_checkpoint))
            named += [(f"data.synth.ensemble[{i}]", n, None) for i, n in enumerate(s.ensemble)]
        if self.eval is not None:
            named.append(("eval.reward", self.eval.reward, self.eval.reward_checkpoint))
        if isinstance(self.method, RewardSource):
            named.append(("method.reward", self.method.reward, self.method.reward_checkpoint))
        monitor = getattr(self.method, "monitor", None)
        if monitor is not None:
            named += [(f"method.monitor.heldout[{i}]", h, None) for i, h in enumerate(monitor.heldout)]
        for key, spec, checkpoint in named:
            check_reward_spec(spec, checkpoint, key=key)
