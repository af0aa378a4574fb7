"""Method name -> objective: the one table a new trainer file adds itself to."""

from __future__ import annotations

from typing import Callable

from trainers.config import DataConfig, DPOConfig, MethodConfig
from trainers.loop import Objective


def _dpo(cfg: DPOConfig, data: DataConfig) -> Objective:
    from trainers.dpo import DiffusionDPO

    return DiffusionDPO(cfg, caption_dropout=data.caption_dropout)


def _smpo(cfg, data: DataConfig) -> Objective:
    from trainers.smpo import SmPO

    return SmPO(cfg)


def _inpo(cfg, data: DataConfig) -> Objective:
    from trainers.inpo import InPO

    return InPO(cfg)


def _rankdpo(cfg, data: DataConfig) -> Objective:
    from trainers.rankdpo import RankDPO

    return RankDPO(cfg)


def _self_npo(cfg, data: DataConfig) -> Objective:
    from trainers.self_npo import SelfNPO

    return SelfNPO(cfg)


def _prdp(cfg, data: DataConfig) -> Objective:
    from trainers.prdp import PRDP

    return PRDP(cfg)


def _flow_dpo(cfg, data: DataConfig) -> Objective:
    from trainers.flow_dpo import FlowDPO

    return FlowDPO(cfg, caption_dropout=data.caption_dropout)


def _flow_rwr(cfg, data: DataConfig) -> Objective:
    from trainers.flow_rwr import FlowRWR

    return FlowRWR(cfg)


def _flow_grpo(cfg, data: DataConfig) -> Objective:
    from trainers.flow_grpo import FlowGRPO

    return FlowGRPO(cfg)


def _diffusion_nft(cfg, data: DataConfig) -> Objective:
    from trainers.diffusion_nft import DiffusionNFT

    return DiffusionNFT(cfg)


OBJECTIVES: dict[str, Callable[[MethodConfig, DataConfig], Objective]] = {
    "dpo": _dpo,
    "smpo": _smpo,
    "inpo": _inpo,
    "rankdpo": _rankdpo,
    "self_npo": _self_npo,
    "prdp": _prdp,
    "flow_dpo": _flow_dpo,
    "flow_rwr": _flow_rwr,
    "flow_grpo": _flow_grpo,
    "diffusion_nft": _diffusion_nft,
}


def build_objective(method: MethodConfig, data: DataConfig) -> Objective:
    if method.name not in OBJECTIVES:
        raise KeyError(f"method {method.name!r} has a config but no objective; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[method.name](method, data)
