"""Reward models and the Python scoring API: ``from rewards import load_reward, list_rewards``."""

from rewards.base import CheckpointError, RewardInputError, RewardModel, RewardOutput, RewardOutputError
from rewards.plugins import RewardPluginError, load_plugins
from rewards.registry import list_rewards, load_reward, register_reward

__all__ = ["RewardModel", "RewardOutput", "RewardInputError", "RewardOutputError", "RewardPluginError",
           "CheckpointError", "load_reward", "list_rewards", "register_reward", "load_plugins"]
