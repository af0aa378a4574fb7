"""The reward-scoring API surface shared by every reward: registry, prompt broadcasting, compare."""

import pytest
import torch

from rewards import RewardInputError, list_rewards, load_reward
from rewards.base import RewardModel, RewardOutput


class MeanBrightness(RewardModel):
    name = "mean-brightness"
    batch_size = 3

    @classmethod
    def from_checkpoint(cls, path=None, **kw):
        return cls()

    def _score(self, batch, prompts, **cond):
        return RewardOutput(scores=batch.flatten(1).mean(1) * (1.0 if prompts is None else len(prompts[0])))


def test_registry_names_every_builtin_and_suggests_on_typos():
    names = list_rewards()
    for n in ("shapes-oracle", "hpsv2", "hpsv2.1", "pickscore", "clipscore", "aesthetic", "imagereward"):
        assert n in names
    with pytest.raises(KeyError, match="did you mean 'pickscore'"):
        load_reward("pickscor")


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_reward("hpsv2", checkpoint=tmp_path / "nope.pt")


def test_single_prompt_broadcasts_and_batches_agree():
    r = MeanBrightness()
    x = torch.rand(7, 3, 4, 4)
    one_string = r.score(x, "abc")
    as_list = r.score(x, ["abc"] * 7)
    torch.testing.assert_close(one_string, as_list)
    torch.testing.assert_close(as_list, torch.cat([r.score(x[i:i + 1], ["abc"]) for i in range(7)]))
    with pytest.raises(RewardInputError, match="7 media but 2 prompts"):
        r.score(x, ["a", "b"])


def test_compare_is_the_bradley_terry_link_and_antisymmetric():
    r = MeanBrightness()
    a, b = torch.rand(4, 3, 4, 4), torch.rand(4, 3, 4, 4)
    p = r.compare(a, b, ["x"] * 4)
    torch.testing.assert_close(p + r.compare(b, a, ["x"] * 4), torch.ones(4))
    torch.testing.assert_close(p, torch.sigmoid(r.score(a, "x") - r.score(b, "x")))


def test_scores_are_no_grad_unless_asked():
    r = MeanBrightness()
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    assert not r.score(x, "a").requires_grad
    r.score(x, "a", differentiable=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_one_checkpoint_error_class_for_every_reward_family():
    """CLIP/BLIP loaders and the VLM loaders raise the same class, so one ``except`` covers every reward."""
    import rewards
    from rewards import clip_checkpoint, vlm_qwen

    assert clip_checkpoint.CheckpointError is vlm_qwen.CheckpointError is rewards.CheckpointError
    assert issubclass(rewards.CheckpointError, ValueError)
