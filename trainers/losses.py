"""Every training objective as a pure function of tensors.

Each function takes per-sample errors (or log-probabilities, rewards, …) and returns the *per-sample* loss, so
the loop takes the mean and a test can compare against an independent float64 computation. Conventions follow
the Diffusion-DPO code (Wallace et al. 2023, Eq. 14 as implemented): err is the per-sample mean over all non-batch dimensions of
(target − prediction)², pairs share t and ε, and β is on the mean-error scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLossOutput:
    """Per-sample loss plus what users watch while training a DPO-family objective."""

    loss: torch.Tensor  # [B]
    logits: torch.Tensor  # [B]  z; z > 0 means the policy prefers the winner more than the reference does
    implicit_acc: torch.Tensor  # scalar: mean(z > 0)
    reward_margin: torch.Tensor  # scalar: mean of the implicit reward margin −(β/2)(Δθ − Δref) = z


def dpo_logits(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
               ref_err_l: torch.Tensor, beta: float) -> torch.Tensor:
    """z = −(β/2)·((err_θ(w) − err_θ(l)) − (err_ref(w) − err_ref(l))) — computed in float32 or wider."""
    dtype = torch.promote_types(model_err_w.dtype, torch.float32)
    model_diff = model_err_w.to(dtype) - model_err_l.to(dtype)
    ref_diff = ref_err_w.to(dtype) - ref_err_l.to(dtype)
    return -0.5 * beta * (model_diff - ref_diff)


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> PreferenceLossOutput:
    """Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14 as the official code implements it:
    one t and one ε per pair, constant ω):

        L = −log σ(−β/2 · ((err_θ(w) − err_θ(l)) − (err_ref(w) − err_ref(l))))

    The log-sigmoid is applied per pair and returned per pair (the mean is the caller's; taking the mean inside
    the log-sigmoid was a known diffusers bug, #6702). ``logsigmoid`` is stable for extreme β·margins (and, unlike
    ``softplus``, has no linear cut-off above 20, so float64 stays exact).
    """
    z = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    loss = -F.logsigmoid(z)
    with torch.no_grad():
        acc = (z > 0).float().mean()
        margin = z.mean()
    return PreferenceLossOutput(loss=loss, logits=z, implicit_acc=acc, reward_margin=margin)


# --- the trainer family --------------------------------------------------------------------------------------------
def smoothed_preference(score_w: torch.Tensor, score_l: torch.Tensor, score_min: float = 0.0,
                        score_max: float = 1.0) -> torch.Tensor:
    """SmPO's smoothed preference p (Lu et al., ICML 2025, arXiv 2506.02698, §3.2 as the code computes it):
    both scores are min–max normalised with dataset-wide bounds, s̃ = (s − min)/(max − min), and
    p = e^{s̃_w}/(e^{s̃_w} + e^{s̃_l}) = σ(s̃_w − s̃_l). The bounds matter: with PickScore's raw cosine on
    Pick-a-Pic v2 they are (0.1154, 0.2820) and p ∈ [0.5, 0.731]."""
    if not score_max > score_min:
        raise ValueError(f"smoothed_preference: score_max ({score_max}) must be above score_min ({score_min})")
    dtype = torch.promote_types(score_w.dtype, torch.float32)
    span = score_max - score_min
    sw = (score_w.to(dtype) - score_min) / span
    sl = (score_l.to(dtype) - score_min) / span
    return torch.sigmoid(sw - sl)


def smpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
              ref_err_l: torch.Tensor, p: torch.Tensor, beta: float, gamma: float = 10.0) -> PreferenceLossOutput:
    """SmPO-Diffusion (Lu et al., ICML 2025, arXiv 2506.02698, Eq. 9–11): the smoothed preference
    p̃(w) ∝ p(w)^α·p(l)^{γ−α} with α = γp multiplies the Diffusion-DPO logit by m = 2α − γ = γ(2p − 1):

        L = −log σ(−β/2 · m · ((err_θ(w) − err_θ(l)) − (err_ref(w) − err_ref(l))))

    err is measured against the inversion-reparametrised ε̃ (see ``inverted_pair_inputs``). p = 0.5 gives m = 0:
    a near-tie contributes ln 2 and no gradient; p < 0.5 flips the pair, exactly as if it were stored the other
    way round (so callers need not reorder pairs by the reward)."""
    dtype = torch.promote_types(model_err_w.dtype, torch.float32)
    m = gamma * (2 * p.to(dtype) - 1)
    z = m * dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    loss = -F.logsigmoid(z)
    with torch.no_grad():
        acc = (z > 0).float().mean()
        margin = z.mean()
    return PreferenceLossOutput(loss=loss, logits=z, implicit_acc=acc, reward_margin=margin)


def inpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
              ref_err_l: torch.Tensor, beta: float) -> PreferenceLossOutput:
    """DDIM-InPO (Lu et al., CVPR 2025, arXiv 2503.18454, Eq. 15): the Diffusion-DPO logit with x̃_t from DDIM
    inversion of each image and the reparametrised target ε̃_t = (x̃_t − √ᾱ_t·x0)/√(1 − ᾱ_t):

        L = −log σ(−β/2 · ((err_θ(w) − err_θ(l)) − (err_ref(w) − err_ref(l)))),  err = ‖ε̃_t − ε(x̃_t, t)‖²/D

    The function of the errors is Diffusion-DPO's; InPO differs in the inputs (``trainers/inpo.py``)."""
    return diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)


def flow_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                  ref_err_l: torch.Tensor, beta: float) -> PreferenceLossOutput:
    """Flow-DPO (Liu et al., *Improving Video Generation with Human Feedback*, arXiv 2501.13918, Eq. 8 with the
    constant β the paper trains with — the derived β_t = β(1 − t)² over-optimised):

        L = −log σ(−β/2 · ((err_θ(w) − err_θ(l)) − (err_ref(w) − err_ref(l)))),  err = ‖(ε − x0) − v(x_σ, σ)‖²/D

    Velocity errors are ~50× ε errors in scale, hence β ≈ 100 rather than Diffusion-DPO's 5000."""
    return diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)


def rank_gains(scores: torch.Tensor) -> torch.Tensor:
    """RankDPO's label gains φ (Karthik et al., ICCV 2025, arXiv 2410.18013, Alg. 1): ``scores`` [n_rewards, k]
    (or [k]) → φ_i = C_i / (n(k − 1)) ∈ [0, 1], C_i the number of (reward, other image) comparisons image i
    wins. Ties count half a win each (the paper is silent; half keeps φ symmetric, so tied images get equal φ and
    make no pair)."""
    s = scores.to(torch.float64)
    if s.dim() == 1:
        s = s.unsqueeze(0)
    n, k = s.shape
    if k < 2:
        raise ValueError(f"rank_gains needs at least 2 images per list, got {k}")
    diff = s.unsqueeze(2) - s.unsqueeze(1)  # [n, k, k]: s_i − s_j
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    wins = wins.sum(dim=(0, 2)) - 0.5 * n  # drop the i == j self-ties
    return (wins / (n * (k - 1))).to(scores.dtype if scores.is_floating_point() else torch.float32)


def rankdpo_loss(model_err: torch.Tensor, ref_err: torch.Tensor, gains: torch.Tensor,
                 beta: float) -> PreferenceLossOutput:
    """RankDPO (Karthik et al., ICCV 2025, arXiv 2410.18013, Alg. 2): for each list of k images sharing (t, ε),
    s_i = err_θ(i) − err_ref(i) (the Diffusion-DPO implicit score, lower = preferred), π_i the rank of s_i among
    the list under the *current* model (ascending, 1 = best, ties broken by position), and for every pair with
    φ_i > φ_j:

        Δ_ij = |2^{φ_i} − 2^{φ_j}| · |1/log2(1 + π_i) − 1/log2(1 + π_j)|     (LambdaRank-style DCG weight)
        L    = Σ_{φ_i > φ_j} Δ_ij · −log σ(−β · (s_i − s_j))

    Δ is a constant (no gradient through the ranks). ``beta`` multiplies s with no ½ as in the paper; the
    RankDPO objective passes the recipe's DPO-convention β/2, so k = 2 is Diffusion-DPO scaled by Δ.
    Inputs are [B, k]; returns the per-list loss [B]. Pairs with equal gains (ties) contribute nothing."""
    if model_err.shape != ref_err.shape or model_err.shape != gains.shape or model_err.dim() != 2:
        raise ValueError(f"rankdpo_loss: model_err {tuple(model_err.shape)}, ref_err {tuple(ref_err.shape)} and "
                         f"gains {tuple(gains.shape)} must all be [B, k]")
    dtype = torch.promote_types(model_err.dtype, torch.float32)
    s = model_err.to(dtype) - ref_err.to(dtype)
    b, k = s.shape
    with torch.no_grad():
        # stable sort: equal s keep their position, so at initialisation (all s = 0) π is the list order
        order = torch.sort(s.detach(), dim=1, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, k + 1, device=s.device).expand(b, k))
        inv_discount = 1.0 / torch.log2(1.0 + ranks.to(dtype))
        g = gains.to(dtype)
        better = g.unsqueeze(2) > g.unsqueeze(1)  # [B, k, k]: i ≻ j by label
        weight = ((2.0 ** g).unsqueeze(2) - (2.0 ** g).unsqueeze(1)).abs() * \
            (inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)).abs()
        weight = torch.where(better, weight, torch.zeros_like(weight))
    z = -beta * (s.unsqueeze(2) - s.unsqueeze(1))  # [B, k, k]: logit of i ≻ j
    pair_loss = -F.logsigmoid(z)
    loss = (weight * pair_loss).sum(dim=(1, 2))
    with torch.no_grad():
        n_pairs = better.sum().clamp(min=1)
        acc = ((z > 0) & better).sum().float() / n_pairs
        margin = (z * better).sum() / n_pairs
    return PreferenceLossOutput(loss=loss, logits=z, implicit_acc=acc, reward_margin=margin)


def self_npo_loss(student_x0: torch.Tensor, target_x0: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Self-NPO (arXiv 2505.11777, truncated diffusion fine-tuning, as G-U-N/Diffusion-NPO trains it): the
    pseudo-Huber distance between the student's x̂0 at (x', t', real caption) and the EMA teacher's
    *unconditional* x̂0 a few DDIM steps earlier, mean over non-batch dims:

        L = mean(√((x̂0_student − x̂0_teacher)² + c²) − c),   c = 0.001

    Returns [B]. Huber(0) = 0 and Huber(1) = √(1 + c²) − c."""
    diff = student_x0.float() - target_x0.float().detach()
    return (torch.sqrt(diff.pow(2) + c * c) - c).flatten(1).mean(dim=1)


def prdp_loss(logratio: torch.Tensor, logratio_old: torch.Tensor, rewards: torch.Tensor, pair_a: torch.Tensor,
              pair_b: torch.Tensor, beta: float, clip: float) -> torch.Tensor:
    """PRDP (Deng et al., CVPR 2024, arXiv 2402.08714, Eq. 9 and the proximal Eq. 12): reward difference
    prediction on trajectories sampled from θ_old.

    ``logratio`` [N, S] holds per-step log p_θ(x_{t−1}|x_t)/p_ref(x_{t−1}|x_t) along N stored trajectories (the
    graph to θ), ``logratio_old`` the same under θ_old (no grad), ``rewards`` [N]; ``pair_a``/``pair_b`` index
    the pairs (trajectories of the same prompt). With r̂ = Σ_t logratio and the clipped r̂ᶜ = Σ_t clip(logratio_t,
    old_t − ε, old_t + ε) (clipping is centred on θ_old, not on the reference):

        L_ab = max((r̂_a − r̂_b − (r_a − r_b)/β)², (r̂ᶜ_a − r̂ᶜ_b − (r_a − r_b)/β)²)

    Returns [P]. θ = θ_old = ref gives mean((Δr/β)²); equal rewards and θ = ref give exactly 0."""
    dtype = torch.promote_types(logratio.dtype, torch.float32)
    lr, old = logratio.to(dtype), logratio_old.to(dtype).detach()
    clipped = torch.maximum(torch.minimum(lr, old + clip), old - clip)
    r_hat, r_hat_c = lr.sum(dim=1), clipped.sum(dim=1)
    target = (rewards.to(dtype)[pair_a] - rewards.to(dtype)[pair_b]) / beta
    err = (r_hat[pair_a] - r_hat[pair_b] - target).pow(2)
    err_c = (r_hat_c[pair_a] - r_hat_c[pair_b] - target).pow(2)
    return torch.maximum(err, err_c)


def rwr_loss(model_err: torch.Tensor, rewards: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Flow-RWR (Liu et al., arXiv 2501.13918, §4.2; reward-weighted regression, Peters & Schaal 2007):
    L = E[w · ‖(ε − x0) − v_θ(x_σ, σ)‖²] with w ∝ exp(r/τ). The weights are normalised over the batch to mean 1,
    w_i = B · softmax(r/τ)_i (the paper leaves normalisation open; mean-1 keeps the loss on the SFT scale, so the
    learning rate means the same as for plain fine-tuning and equal rewards give exactly the SFT loss).
    Returns the per-sample weighted error [B]."""
    if temperature <= 0:
        raise ValueError(f"rwr_loss: temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(model_err.dtype, torch.float32)
    w = torch.softmax(rewards.to(dtype).detach() / temperature, dim=0) * rewards.shape[0]
    return w * model_err.to(dtype)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     clip: float | None = None, std_over: str = "group") -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024; Flow-GRPO, Liu et al. 2025, Eq. 4): rows are G = ``group_size``
    consecutive samples of one prompt, A_i = (r_i − mean_G r) / (std r + eps) with the population std (ddof 0: the
    group is normalised as a whole; docs/online_rl.md, "Advantages"). ``std_over`` "group" takes the std over the
    prompt's G samples (the paper's equation); "batch" over every sample of the call, still centred per group (the
    official code's ``global_std``), so a prompt whose samples barely differ keeps small advantages instead of
    having its noise scaled up to ±1. A zero std gives exactly 0 (no NaN); ``clip`` bounds |A| (5 by default).
    Returns [N] in float32 or wider."""
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    if std_over not in ("group", "batch"):
        raise ValueError(f"group_advantages: std_over must be 'group' or 'batch', got {std_over!r}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).detach().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_over == "group":
        std = r.std(dim=1, unbiased=False, keepdim=True)
    else:
        std = r.std(unbiased=False).expand_as(centred)
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))  # also with eps = 0
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(-1)


def flow_grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                   kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> torch.Tensor:
    """Flow-GRPO's clipped objective (Liu et al. 2025, arXiv 2505.05470, Eq. 5 — PPO's surrogate per denoising step):
    with ρ = exp(log p_θ − log p_old) per trained step,

        L_i = mean_steps max(−A_i·ρ, −A_i·clip(ρ, 1 − ε, 1 + ε)) + β_KL · mean_steps KL_i

    ``logp`` [N, S] (graph to θ) and ``logp_old`` [N, S] are the per-dimension-mean log-densities of the stored
    transitions, ``advantages`` [N], ``kl`` [N, S] an optional per-step KL to the reference. Returns [N]."""
    if clip_range <= 0:
        raise ValueError(f"flow_grpo_loss: clip_range must be > 0, got {clip_range}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    ratio = torch.exp(logp.to(dtype) - logp_old.to(dtype).detach())
    adv = advantages.to(dtype).detach().unsqueeze(1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean(dim=1)
    if kl is not None and kl_beta:
        loss = loss + kl_beta * kl.to(dtype).mean(dim=1)
    return loss


def nft_optimality(rewards: torch.Tensor, group_size: int, clip: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """DiffusionNFT's optimality probability r ∈ [0, 1] (Zheng et al. 2025, arXiv 2509.16117, §3): the group-relative
    advantage A (``group_advantages``) clipped to [−c, c] and mapped linearly, r = ½ + ½·clip(A, −c, c)/c. Better than
    the group mean -> r > ½ (pulled towards), worse -> r < ½ (pushed away), a constant group -> r = ½ (no signal)."""
    if clip <= 0:
        raise ValueError(f"nft_optimality: clip must be > 0, got {clip}")
    adv = group_advantages(rewards, group_size, eps=eps, clip=clip)
    return 0.5 + 0.5 * adv / clip


def diffusion_nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor,
                       beta: float = 1.0) -> torch.Tensor:
    """DiffusionNFT's negative-aware flow-matching loss (Zheng et al. 2025, arXiv 2509.16117, Eq. 8) on the forward
    process: with the implicit positive and negative policies

        v⁺ = (1 − β)·v_old + β·v_θ,    v⁻ = (1 + β)·v_old − β·v_θ,

        L_i = r_i·‖v⁺ − v‖² + (1 − r_i)·‖v⁻ − v‖²   (per-sample means over every non-batch dimension)

    where v is the family's regression target (ε − x0 for flows) at x_t of the sample's own clean x0. ``v_old`` is
    the sampling policy's prediction (no grad). At θ = old both branches equal v_old and the gradient is
    2β(2r − 1)·(v_old − v)·∂v_θ: r > ½ regresses towards v, r < ½ away from it. Returns [B]."""
    if beta <= 0:
        raise ValueError(f"diffusion_nft_loss: beta must be > 0, got {beta}")
    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    v, old, tgt = v_theta.to(dtype), v_old.to(dtype).detach(), target.to(dtype).detach()
    positive = (1 - beta) * old + beta * v
    negative = (1 + beta) * old - beta * v
    err_pos = (positive - tgt).pow(2).flatten(1).mean(dim=1)
    err_neg = (negative - tgt).pow(2).flatten(1).mean(dim=1)
    w = r.to(dtype).detach()
    return w * err_pos + (1 - w) * err_neg
