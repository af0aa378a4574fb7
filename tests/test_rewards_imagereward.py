"""ImageReward: a tiny BLIP (ViT + MED BERT with cross-attention) + MLP saved as ``ImageReward.pt`` with its
``med_config.json`` and a local BERT vocabulary, loaded through ``load_reward`` and checked against a
functional re-computation of the published model straight from the state dict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.media import MediaError
from rewards import RewardInputError, load_reward
from rewards.clip_checkpoint import CheckpointError
from rewards.imagereward import MEAN, STD, ImageRewardNet
from rewards.blip import BlipVisionConfig, MedTextConfig

WORDS = ("a the of on in with and red blue green cat dog cube sphere photo painting astronaut horse riding "
         "table sky city night small big").split()
VISION = {"image_size": 32, "patch_size": 16, "width": 32, "depth": 2, "heads": 4}
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
       "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 40,
       "encoder_width": 768, "add_cross_attention": True}
PROMPTS = ["a red cat on a table", "a photo of a dog", "an astronaut riding a horse", "a red cat on a table"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The released file set, tiny: ImageReward.pt (bare state dict), med_config.json, tokenizer/vocab.txt."""
    root = tmp_path_factory.mktemp("imagereward")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (root / "med_config.json").write_text(json.dumps(MED))
    torch.manual_seed(7)
    net = ImageRewardNet(BlipVisionConfig(**VISION), MedTextConfig.from_dict(MED))
    with torch.no_grad():  # non-trivial LayerNorm affines so a wrong eps/order would show
        for name, p in net.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    sd = net.state_dict()
    torch.save(sd, root / "ImageReward.pt")
    return root, {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def reward(release):
    root, _ = release
    return load_reward("imagereward", checkpoint=root / "ImageReward.pt", vision=VISION, batch_size=3)


# --- independent computation, from the architecture description -------------------------------------------


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _lin(x, sd, key):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _mha(q_in, kv_in, sd, key, heads, mask=None):
    q, k, v = _lin(q_in, sd, key + ".query"), _lin(kv_in, sd, key + ".key"), _lin(kv_in, sd, key + ".value")
    B, Lq, D = q.shape
    split = lambda t: t.view(B, t.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731
    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
    if mask is not None:
        att = att + mask
    return (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Lq, D)


def reference_reward(sd, pixels, input_ids, attn_mask):
    """ViT-L-style encoder (LN eps 1e-6) → MED BERT (LN eps 1e-12; bidirectional self-attn with padding mask,
    cross-attn to all image tokens) → MLP on [CLS] → (raw − mean) / std."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    for i in range(VISION["depth"]):
        b = f"{v}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = _lin(h, sd, b + "attn.qkv").view(B, N, 3, VISION["heads"], C // VISION["heads"]).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(C // VISION["heads"])).softmax(-1) @ qkv[2]
        x = x + _lin(a.transpose(1, 2).reshape(B, N, C), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    img = _ln(x, sd, v + "norm", 1e-6)

    t = "blip.text_encoder."
    L = input_ids.shape[1]
    h = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    h = _ln(h, sd, t + "embeddings.LayerNorm", 1e-12)
    mask = (1.0 - attn_mask[:, None, None, :].float()) * -10000.0
    heads = MED["num_attention_heads"]
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        h = _ln(_lin(_mha(h, h, sd, b + "attention.self", heads, mask), sd, b + "attention.output.dense") + h,
                sd, b + "attention.output.LayerNorm", 1e-12)
        h = _ln(_lin(_mha(h, img, sd, b + "crossattention.self", heads), sd, b + "crossattention.output.dense")
                + h, sd, b + "crossattention.output.LayerNorm", 1e-12)
        ff = _lin(F.gelu(_lin(h, sd, b + "intermediate.dense")), sd, b + "output.dense")
        h = _ln(ff + h, sd, b + "output.LayerNorm", 1e-12)
    z = h[:, 0]
    for idx in (0, 2, 4, 6, 7):  # dropouts between, no activations
        z = _lin(z, sd, f"mlp.layers.{idx}")
    return ((z.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072)


def _preprocess(img: Image.Image) -> torch.Tensor:
    """ImageReward's transform on a tensor: Resize(32 shortest, bicubic) → CenterCrop → Normalize; the resized
    values are clamped to [0, 1] as upstream's PIL (uint8) resize does."""
    import torchvision.transforms.functional as TF

    t = TF.resize(TF.to_tensor(img), [32], interpolation=TF.InterpolationMode.BICUBIC).clamp(0, 1)
    t = TF.center_crop(t, [32])
    return TF.normalize(t, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (48, 40), (33, 64), (90, 45), (20, 31)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


# --- tests -------------------------------------------------------------------------------------------------


def test_score_equals_published_formula(reward, release):
    _, sd = release
    imgs = _images(4)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        ref = reference_reward(sd, torch.stack([_preprocess(i) for i in imgs]), tok["input_ids"],
                               tok["attention_mask"])
    torch.testing.assert_close(reward.score(imgs, PROMPTS), ref, atol=1e-5, rtol=0)


def test_z_normalisation_constants(reward):
    x = torch.rand(2, 3, 32, 32)
    tok = reward.tokenize(PROMPTS[:2])
    with torch.no_grad():
        raw = reward.net.raw(_norm(x), tok["input_ids"], tok["attention_mask"])  # 32² input: no resize
    torch.testing.assert_close(reward.score(x, PROMPTS[:2]), (raw - MEAN) / STD, atol=1e-5, rtol=0)
    assert (MEAN, STD) == (0.16717362830052426, 1.0333394966054072)


def _norm(x):
    m = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    s = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (x - m) / s


def test_prompts_cut_at_35_tokens_and_encoder_is_bidirectional(reward):
    tok = reward.tokenize(["cat " * 60])
    assert tok["input_ids"].shape == (1, 35)
    x = torch.rand(1, 3, 32, 32)
    long_a = "a red cat " * 12 + "dog"   # differs only after token 35
    long_b = "a red cat " * 12 + "horse"
    assert torch.equal(reward.score(x, [long_a]), reward.score(x, [long_b]))
    # [CLS] is read out at position 0: it sees the last word only if self-attention is not causal
    assert not torch.allclose(reward.score(x, ["a red cat"]), reward.score(x, ["a red dog"]))


def test_batched_equals_one_at_a_time_and_ranks(reward):
    imgs = _images(5, seed=1)
    prompts = PROMPTS + ["blue sky"]
    batched = reward.score(imgs, prompts)  # internal batch 3 with mixed sizes
    single = torch.cat([reward.score([i], [p]) for i, p in zip(imgs, prompts)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    ranks, rewards = reward.inference_rank("a red cat", imgs)
    s = torch.tensor(rewards)
    assert sorted(ranks) == [1, 2, 3, 4, 5]
    assert ranks[int(s.argmax())] == 1 and ranks[int(s.argmin())] == 5


def test_differentiable_gives_pixel_gradients(reward):
    x = torch.rand(2, 3, 40, 48, requires_grad=True)
    s = reward.score(x, PROMPTS[:2], differentiable=True)
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not reward.score(x, PROMPTS[:2]).requires_grad


def test_compare_is_bradley_terry_on_raw_head(reward):
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    p = reward.compare(a, b, PROMPTS[:2])
    torch.testing.assert_close(p, torch.sigmoid(STD * (reward.score(a, PROMPTS[:2]) - reward.score(b, PROMPTS[:2]))))


def test_folder_checkpoint_finds_config_and_tokenizer(release, reward):
    root, _ = release
    r = load_reward("imagereward", checkpoint=root, vision=VISION)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(r.score(x, PROMPTS[:2]), reward.score(x, PROMPTS[:2]))


def test_missing_keys_listed_with_file(release, tmp_path):
    root, sd = release
    bad = dict(sd)
    bad.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    bad.pop("mlp.layers.7.bias")
    torch.save(bad, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((root / "med_config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_reward("imagereward", checkpoint=tmp_path / "ImageReward.pt", tokenizer=root / "tokenizer",
                    vision=VISION)
    msg = str(err.value)
    assert str(tmp_path / "ImageReward.pt") in msg
    assert "crossattention.self.key.weight" in msg and "mlp.layers.7.bias" in msg


def test_missing_files_say_what_to_pass(release, tmp_path):
    root, sd = release
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        load_reward("imagereward")
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        load_reward("imagereward", checkpoint=tmp_path / "ImageReward.pt", vision=VISION)
    (tmp_path / "med_config.json").write_text((root / "med_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_reward("imagereward", checkpoint=tmp_path / "ImageReward.pt", vision=VISION)


def test_bad_med_config_names_key(release, tmp_path):
    root, _ = release
    cfg = dict(MED)
    cfg.pop("hidden_size")
    (tmp_path / "med.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="med.json.*hidden_size"):
        load_reward("imagereward", checkpoint=root / "ImageReward.pt", med_config=tmp_path / "med.json",
                    vision=VISION)


@pytest.mark.parametrize("bad", [torch.rand(2, 8000), torch.rand(1, 5, 3, 32, 32)], ids=["audio", "video"])
def test_wrong_modality(reward, bad):
    with pytest.raises(MediaError, match="imagereward"):
        reward.score(bad, PROMPTS[:1])
    with pytest.raises(RewardInputError, match="prompt"):
        reward.score(torch.rand(1, 3, 32, 32))


def test_exact_preprocess_equals_upstream_pil_transform(reward, release):
    """preprocess="exact": ImageReward's own transform — torchvision Resize(bicubic) on the PIL image →
    CenterCrop (rounded offsets) → ToTensor → Normalize — gives identical pixels and the score to 1e-5
    relative; the default fast path is ~1/255 per pixel away."""
    from torchvision import transforms as T

    root, sd = release
    exact = load_reward("imagereward", checkpoint=root / "ImageReward.pt", vision=VISION, preprocess="exact")
    upstream = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                          lambda im: im.convert("RGB"), T.ToTensor(),
                          T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    rng = np.random.default_rng(3)
    sizes = [(49, 33), (33, 61), (90, 45), (20, 31)]  # 49×33 → 47×32: margin 15, round puts the crop at 8
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    pixels = torch.stack([upstream(im) for im in imgs])
    tok = exact.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        ref = reference_reward(sd, pixels, tok["input_ids"], tok["attention_mask"])
    ours = exact.score(imgs, PROMPTS)
    assert float(((ours - ref).abs() / ref.abs()).max()) <= 1e-5
    fast = reward.score(imgs, PROMPTS)
    assert float((fast - ref).abs().max()) > 1e-5  # the fast path is close, not identical
    with pytest.raises(RewardInputError, match="preprocess='exact'"):
        exact.score(torch.rand(1, 3, 32, 32), PROMPTS[:1], differentiable=True)
