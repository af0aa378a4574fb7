"""CLIP-family rewards: tiny random models saved in the released layouts, loaded back through ``load_reward``,
and checked against the published formulas computed independently (open_clip / transformers / torchvision
called directly, never through rewards/)."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip  # a core dependency (pyproject)
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.media import MediaError
from rewards import RewardInputError, list_rewards, load_reward
from rewards.clip_checkpoint import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# a ~1.7 M-parameter open_clip ViT; vocab kept at 49408 so the bundled BPE tokenizer works offline
OC_CFG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
PROMPTS = ["a red cube on a table", "a photo of a dog", "an astronaut riding a horse", "a red cube on a table",
           "blue sky"]


def _images(seed: int = 0):
    """PIL images of mixed sizes and aspect ratios (letterbox and crop both have work to do)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (32, 32), (50, 64), (17, 23), (96, 48)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# --- HPS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    """An HPS-layout checkpoint: {'state_dict': bare open_clip names}, fp16 like the released *_compressed.pt."""
    torch.manual_seed(1)
    model = open_clip.CLIP(**OC_CFG)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def hps_reference(hps_ckpt):
    """The hpsv2 package's recipe, written from its formula: create the open_clip model, load the state dict,
    preprocess with torchvision (ToTensor → ResizeMaxSize(224→here 32, bicubic, on the tensor) → pad → Normalize),
    cos of the normalised features (no logit scale)."""
    import torchvision.transforms.functional as TF

    model = open_clip.CLIP(**OC_CFG)
    model.load_state_dict(torch.load(hps_ckpt, weights_only=True)["state_dict"])
    model.eval()
    tok = open_clip.get_tokenizer("ViT-H-14")
    size = 32

    def preprocess(img: Image.Image) -> torch.Tensor:
        t = TF.to_tensor(img)
        h, w = t.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            t = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC)
        ph, pw = size - t.shape[1], size - t.shape[2]
        t = TF.pad(t, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return TF.normalize(t, CLIP_MEAN, CLIP_STD)

    def score(img, prompt) -> float:
        with torch.no_grad():
            fi = model.encode_image(preprocess(img).unsqueeze(0), normalize=True)
            ft = model.encode_text(tok([prompt]), normalize=True)
        return float((fi @ ft.T).diagonal()[0])

    return score


@pytest.fixture(scope="module")
def hps(hps_ckpt):
    return load_reward("hpsv2.1", checkpoint=hps_ckpt, arch=OC_CFG, batch_size=2)


def test_registry_lists_clip_family():
    assert {"hpsv2", "hpsv2.1", "pickscore", "clipscore", "aesthetic", "imagereward"} <= set(list_rewards())


def test_hps_equals_hpsv2_formula_and_preprocessing(hps, hps_reference):
    imgs = _images()
    ours = hps.score(imgs, PROMPTS)
    ref = torch.tensor([hps_reference(i, p) for i, p in zip(imgs, PROMPTS)])
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert hps.name == "hpsv2.1"


def test_hps_batched_equals_one_at_a_time(hps):
    imgs = _images(3)
    batched = hps.score(imgs, PROMPTS)  # internal batch 2: 3 chunks, mixed sizes inside each
    single = torch.cat([hps.score([i], [p]) for i, p in zip(imgs, PROMPTS)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    # a stacked tensor batch goes through the same numbers as the same images given as a list
    x = torch.rand(4, 3, 48, 40)
    torch.testing.assert_close(hps.score(x, PROMPTS[:4]), hps.score(list(x), PROMPTS[:4]), atol=1e-5, rtol=0)


def test_hps_differentiable_gives_pixel_gradients(hps):
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    plain = hps.score(x, PROMPTS[:2])
    assert not plain.requires_grad  # no graph by default
    s = hps.score(x, PROMPTS[:2], differentiable=True)
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(s.detach(), plain)


def test_hps_text_cache_follows_weight_updates(hps_ckpt):
    r = load_reward("hpsv2", checkpoint=hps_ckpt, arch=OC_CFG)
    x = torch.rand(2, 3, 32, 32)
    before = r.score(x, PROMPTS[:2])
    with torch.no_grad():  # an optimizer-style in-place update of the text tower
        r.tower.model.ln_final.weight.mul_(-1.0)
    after = r.score(x, PROMPTS[:2])
    fresh = r.tower.model.encode_text(r.tower.tokenizer(PROMPTS[:2]), normalize=True)
    img = r.tower.model.encode_image(r._pixels(x), normalize=True)
    torch.testing.assert_close(after, (img * fresh).sum(-1).detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(before, after)


def test_truncated_text_encoding_equals_full_context(hps):
    """The text tower stops at the longest prompt's end token; padding cannot matter under the causal mask."""
    prompts = ["a", "an astronaut riding a horse on the moon in a watercolor style, highly detailed", "blue sky"]
    m, tok = hps.tower.model, hps.tower.tokenizer
    with torch.no_grad():
        full = m.encode_text(tok(prompts))
        short = hps.tower.encode_text(prompts)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_hps_loads_on_fp16_checkpoint_into_fp32_and_compare_uses_logit_scale(hps):
    assert next(hps.parameters()).dtype == torch.float32
    x = torch.rand(3, 3, 32, 32)
    y = torch.rand(3, 3, 32, 32)
    p = hps.compare(x, y, PROMPTS[:3])
    s = hps.tower.logit_scale.float().exp()
    torch.testing.assert_close(p, torch.sigmoid(s * (hps.score(x, PROMPTS[:3]) - hps.score(y, PROMPTS[:3]))))


def test_hps_missing_and_unexpected_keys_name_the_file(hps_ckpt, tmp_path):
    sd = torch.load(hps_ckpt, weights_only=True)["state_dict"]
    sd.pop("visual.proj")
    sd["visual.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError) as err:
        load_reward("hpsv2", checkpoint=bad, arch=OC_CFG)
    msg = str(err.value)
    assert "broken.pt" in msg and "visual.proj" in msg and "visual.extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg


def test_hps_wrong_architecture_reports_shapes(hps_ckpt):
    other = json.loads(json.dumps(OC_CFG))
    other["embed_dim"] = 16
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_reward("hpsv2", checkpoint=hps_ckpt, arch=other)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Image.new("RGB", (1, 1))}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_reward("hpsv2", checkpoint=path, arch=OC_CFG)


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt"):
        load_reward("hpsv2")
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt"):
        load_reward("hpsv2.1")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_reward("hpsv2", checkpoint=tmp_path / "nope.pt")


@pytest.mark.parametrize("bad", [torch.rand(2, 16000), torch.rand(2, 4, 3, 32, 32)], ids=["audio", "video"])
def test_wrong_modality_is_a_clear_error(hps, bad):
    with pytest.raises(MediaError, match="hpsv2.1.*images"):
        hps.score(bad, PROMPTS[:2])


def test_prompts_are_required_and_counted(hps):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(RewardInputError, match="prompt"):
        hps.score(x)
    with pytest.raises(RewardInputError, match="2 media but 3 prompts"):
        hps.score(x, PROMPTS[:3])


# --- transformers-CLIP scorers -----------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _write_clip_folder(folder, seed: int, projection_dim: int = 16, image_size: int = 32, patch_size: int = 8):
    """A transformers CLIP folder: config + safetensors + a byte-level BPE tokenizer (no merges: any text
    tokenises) + preprocessor_config.json — the layout of PickScore_v1 / openai CLIP releases, tiny."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return _write_clip_folder(tmp_path_factory.mktemp("pickscore") / "PickScore_v1", seed=2)


@pytest.fixture(scope="module")
def hf_reference(clip_folder):
    """transformers' own CLIPModel + CLIPProcessor (the PickScore README recipe): normalised features."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_folder)
    tok = AutoTokenizer.from_pretrained(clip_folder)

    def feats(images, texts):
        with torch.no_grad():
            pv = proc(images=images, return_tensors="pt")["pixel_values"]
            fi = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
            t = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            ft = model.text_projection(model.text_model(**t).pooler_output)
        return F.normalize(fi, dim=-1), F.normalize(ft, dim=-1), model.logit_scale.exp().item()

    return feats


def _square_images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_pickscore_equals_scaled_cosine(clip_folder, hf_reference):
    r = load_reward("pickscore", checkpoint=clip_folder)
    imgs = _square_images()
    fi, ft, scale = hf_reference(imgs, PROMPTS[:4])
    torch.testing.assert_close(r.score(imgs, PROMPTS[:4]), scale * (fi * ft).sum(-1), atol=1e-4, rtol=0)


def test_pickscore_resize_crop_close_to_processor(clip_folder, hf_reference):
    """Non-square, larger images: our float-tensor resize vs the processor's uint8 resize differ by ~1/255."""
    r = load_reward("pickscore", checkpoint=clip_folder)
    imgs = _images(5)
    fi, ft, scale = hf_reference(imgs, PROMPTS)
    ref = scale * (fi * ft).sum(-1)
    ours = r.score(imgs, PROMPTS)
    assert (ours - ref).abs().max() < 0.02 * scale  # cos within 0.02 on random tiny weights
    torch.testing.assert_close(ours, torch.cat([r.score([i], [p]) for i, p in zip(imgs, PROMPTS)]),
                               atol=1e-5, rtol=0)


def test_pickscore_differentiable(clip_folder):
    r = load_reward("pickscore", checkpoint=clip_folder)
    x = torch.rand(2, 3, 40, 36, requires_grad=True)
    r.score(x, PROMPTS[:2], differentiable=True).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_clipscore_is_hessel_formula(clip_folder, hf_reference):
    r = load_reward("clipscore", checkpoint=clip_folder)
    imgs = _square_images(6, seed=4)
    prompts = [f"caption number {i}" for i in range(6)]
    fi, ft, _ = hf_reference(imgs, ["A photo depicts " + p for p in prompts])
    cos = (fi * ft).sum(-1)
    torch.testing.assert_close(r.score(imgs, prompts), 2.5 * cos.clamp(min=0), atol=1e-4, rtol=0)
    # flip the image embedding: every cosine turns negative and max(cos, 0) must floor the score at 0
    with torch.no_grad():
        r.tower.model.visual_projection.weight.neg_()
    assert (cos > 0).all()
    torch.testing.assert_close(r.score(imgs, prompts), torch.zeros(6))
    plain = load_reward("clipscore", checkpoint=clip_folder, prefix="", w=100.0)
    fi2, ft2, _ = hf_reference(imgs, prompts)
    torch.testing.assert_close(plain.score(imgs, prompts), 100 * (fi2 * ft2).sum(-1).clamp(min=0),
                               atol=2e-3, rtol=0)


def test_hf_clip_folder_with_missing_weights_is_an_error(clip_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad_clip"
    shutil.copytree(clip_folder, bad)
    sd = load_file(bad / "model.safetensors")
    sd.pop("visual_projection.weight")
    sd["something.else"] = torch.zeros(1)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_reward("pickscore", checkpoint=bad)
    assert "visual_projection.weight" in str(err.value) and "something.else" in str(err.value)
    assert "bad_clip" in str(err.value)


# --- LAION aesthetic v2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    """The released layout: a .pth OrderedDict with keys layers.{0,2,4,6,7}.{weight,bias} + a CLIP folder."""
    root = tmp_path_factory.mktemp("aesthetic")
    clip = _write_clip_folder(root / "clip", seed=3, projection_dim=24)
    torch.manual_seed(5)
    dims = [24, 1024, 128, 64, 16, 1]
    sd = {}
    for idx, (i, o) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        sd[f"layers.{idx}.weight"] = torch.randn(o, i) / math.sqrt(i)
        sd[f"layers.{idx}.bias"] = torch.randn(o) * 0.1
    head = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(sd, head)
    return head, clip, sd


def test_aesthetic_is_affine_map_of_normalised_embedding(aesthetic_files, hf_reference):
    head, clip, sd = aesthetic_files
    r = load_reward("aesthetic", checkpoint=head, clip=clip)
    # closed form: no activations, so the head collapses to x̂ ↦ A·x̂ + c
    A, c = torch.eye(24, dtype=torch.float64), torch.zeros(24, dtype=torch.float64)
    for idx in (0, 2, 4, 6, 7):
        W, bb = sd[f"layers.{idx}.weight"].double(), sd[f"layers.{idx}.bias"].double()
        A, c = W @ A, W @ c + bb
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip).eval()
    imgs = _square_images(3, seed=6)
    pv = CLIPImageProcessor.from_pretrained(clip)(images=imgs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = F.normalize(model.visual_projection(model.vision_model(pixel_values=pv).pooler_output), dim=-1)
    ref = (emb.double() @ A.T + c).squeeze(-1).float()
    torch.testing.assert_close(r.score(imgs), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.score(imgs, ["ignored"] * 3), ref, atol=1e-4, rtol=0)  # prompts unused


def test_aesthetic_folder_layout_and_gradients(aesthetic_files, tmp_path):
    import shutil

    head, clip, _ = aesthetic_files
    shutil.copy(head, tmp_path / head.name)
    shutil.copytree(clip, tmp_path / "clip")
    r = load_reward("aesthetic", checkpoint=tmp_path)  # folder: the .pth + clip/
    x = torch.rand(2, 3, 48, 32, requires_grad=True)
    s = r.score(x, differentiable=True)
    s.sum().backward()
    assert s.shape == (2,) and x.grad.abs().sum() > 0


def test_aesthetic_head_errors(aesthetic_files, clip_folder, tmp_path):
    head, clip, sd = aesthetic_files
    with pytest.raises(FileNotFoundError, match="clip="):
        load_reward("aesthetic", checkpoint=head)
    partial = dict(sd)
    partial.pop("layers.7.bias")
    bad = tmp_path / "head.pth"
    torch.save(partial, bad)
    with pytest.raises(CheckpointError, match=r"head\.pth.*\n.*layers\.7\.bias"):
        load_reward("aesthetic", checkpoint=bad, clip=clip)
    # a head trained on another CLIP width (here 24-d) cannot sit on a 16-d CLIP
    with pytest.raises(CheckpointError, match="layers.0.weight"):
        load_reward("aesthetic", checkpoint=head, clip=clip_folder)


def _aesthetic_head(dim: int, seed: int) -> dict:
    torch.manual_seed(seed)
    dims = [dim, 1024, 128, 64, 16, 1]
    return {f"layers.{idx}.{kind}": (torch.randn(o, i) / math.sqrt(i) if kind == "weight" else torch.randn(o) * 0.1)
            for idx, (i, o) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])) for kind in ("weight", "bias")}


@pytest.fixture(scope="module")
def aesthetic_224(tmp_path_factory):
    """An aesthetic predictor at the released 224 px geometry (tiny widths, patch 32), so real margins occur."""
    root = tmp_path_factory.mktemp("aesthetic224")
    _write_clip_folder(root / "clip", seed=7, projection_dim=24, image_size=224, patch_size=32)
    torch.save(_aesthetic_head(24, seed=8), root / "sac+logos+ava1-l14-linearMSE.pth")
    return root


@pytest.mark.parametrize("wh, offsets", [((303, 200), (0, 58)), ((201, 333), (74, 0))],
                         ids=["303x200", "201x333"])
def test_aesthetic_crop_rounds_odd_margins_like_openai_clip(aesthetic_224, wh, offsets):
    """OpenAI CLIP's CenterCrop puts an odd margin's extra pixel by round(), not floor: 303×200 resizes to
    339×224 (margin 115 → left 58, floor would say 57); 201×333 to 224×371 (margin 147 → top 74, not 73)."""
    import torchvision.transforms.functional as TF
    from transformers import CLIPModel

    r = load_reward("aesthetic", checkpoint=aesthetic_224)
    w, h = wh
    rng = np.random.default_rng(w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    x = TF.to_tensor(img)
    nh, nw = (224, 224 * w // h) if h <= w else (224 * h // w, 224)
    resized = TF.resize(x, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    model = CLIPModel.from_pretrained(aesthetic_224 / "clip").eval()
    head = _aesthetic_head(24, seed=8)

    def reference(top: int, left: int) -> float:
        pix = TF.normalize(resized[:, top:top + 224, left:left + 224], CLIP_MEAN, CLIP_STD).unsqueeze(0)
        with torch.no_grad():
            e = F.normalize(model.visual_projection(model.vision_model(pixel_values=pix).pooler_output), dim=-1)
            for idx in (0, 2, 4, 6, 7):
                e = e @ head[f"layers.{idx}.weight"].T + head[f"layers.{idx}.bias"]
        return float(e)

    top, left = offsets
    ours = float(r.score([img]))
    assert ours == pytest.approx(reference(top, left), abs=1e-5)
    floor_top, floor_left = max(top - 1, 0), max(left - 1, 0)  # the one-pixel-off crop the floor gave
    assert abs(ours - reference(floor_top, floor_left)) > 1e-4


# --- preprocess="exact": the upstream PIL/uint8 paths ------------------------------------------------------

# sizes whose margins at 32 px are odd with floor(m/2) odd, so floor and round crops differ (49×33 → 47×32,
# margin 15), plus up- and down-scaling and both orientations
EXACT_SIZES = [(49, 33), (33, 61), (50, 64), (17, 23), (96, 48), (303, 200)]


def _odd_images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in EXACT_SIZES]


def _openai_clip_transform(size: int):
    """OpenAI CLIP's ``clip.load`` preprocess (the aesthetic predictor's and, at 224, ImageReward's), built from
    torchvision: Resize(size, bicubic) on the PIL image → CenterCrop(size) → ToTensor → Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def test_pickscore_exact_equals_transformers_pil_processor(clip_folder):
    """transformers' PIL-backend CLIPImageProcessor (the processor PickScore was released with): identical
    pixels, and scores equal to 1e-5 relative; the fast path is ~1/255 away."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    exact = load_reward("pickscore", checkpoint=clip_folder, preprocess="exact")
    fast = load_reward("pickscore", checkpoint=clip_folder)
    imgs = _odd_images()
    prompts = (PROMPTS * 2)[:len(imgs)]
    proc = CLIPImageProcessorPil.from_pretrained(clip_folder)
    ref_pix = torch.stack([proc(images=[im], return_tensors="pt")["pixel_values"][0] for im in imgs])
    batch = exact._images_to_device(exact._prepare(imgs))  # PIL -> 8-bit -> float on the device
    assert float((exact._pixels(batch) - ref_pix).abs().max()) < 1e-6
    assert float((fast._pixels(batch) - ref_pix).abs().max()) > 1e-3  # the fast path is not the same pixels

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = AutoTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        fi = F.normalize(model.visual_projection(model.vision_model(pixel_values=ref_pix).pooler_output), dim=-1)
        t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        ft = F.normalize(model.text_projection(model.text_model(**t).pooler_output), dim=-1)
        ref = model.logit_scale.exp() * (fi * ft).sum(-1)
    assert _rel(exact.score(imgs, prompts), ref) <= 1e-5
    clipscore = load_reward("clipscore", checkpoint=clip_folder, prefix="", preprocess="exact")
    assert _rel(clipscore.score(imgs, prompts), 2.5 * (fi * ft).sum(-1).clamp(min=0)) <= 1e-5


@pytest.mark.parametrize("folder", ["aesthetic_files", "aesthetic_224"])
def test_aesthetic_exact_equals_openai_clip_transform(folder, request):
    """The aesthetic predictor's own pipeline: OpenAI CLIP's PIL transform (rounded crop offsets), CLIP-L image
    embedding, L2 normalisation, the affine head."""
    from transformers import CLIPModel

    if folder == "aesthetic_files":
        head, clip, sd = request.getfixturevalue(folder)
        r = load_reward("aesthetic", checkpoint=head, clip=clip, preprocess="exact")
    else:
        root = request.getfixturevalue(folder)
        clip, sd = root / "clip", _aesthetic_head(24, seed=8)
        r = load_reward("aesthetic", checkpoint=root, preprocess="exact")
    size = r.processor["size"]
    imgs = _odd_images(1) + [Image.fromarray(np.random.default_rng(2).integers(0, 256, (333, 201, 3),
                                                                               dtype=np.uint8))]
    pix = torch.stack([_openai_clip_transform(size)(im) for im in imgs])
    assert float((r._pixels(r._images_to_device(r._prepare(imgs))) - pix).abs().max()) < 1e-6
    model = CLIPModel.from_pretrained(clip).eval()
    with torch.no_grad():
        e = F.normalize(model.visual_projection(model.vision_model(pixel_values=pix).pooler_output), dim=-1)
        for idx in (0, 2, 4, 6, 7):
            e = e @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    assert _rel(r.score(imgs), e.squeeze(-1)) <= 1e-5


def test_hps_exact_scores_float_input_as_its_saved_8bit_image(hps_ckpt, hps_reference):
    """HPS's upstream transform is ToTensor + tensor resize, i.e. the fast path on 8-bit input; "exact" makes a
    float image (generator output) score as that image written to a PNG and read back by hpsv2 would."""
    exact = load_reward("hpsv2.1", checkpoint=hps_ckpt, arch=OC_CFG, preprocess="exact")
    fast = load_reward("hpsv2.1", checkpoint=hps_ckpt, arch=OC_CFG)
    x = torch.rand(3, 3, 40, 56)
    saved = [Image.fromarray(t.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for t in x]
    ref = torch.tensor([hps_reference(im, p) for im, p in zip(saved, PROMPTS)])
    assert _rel(exact.score(x, PROMPTS[:3]), ref) <= 1e-5
    imgs = _odd_images()
    torch.testing.assert_close(exact.score(imgs, PROMPTS + PROMPTS[:1]), fast.score(imgs, PROMPTS + PROMPTS[:1]))


def test_exact_preprocess_is_not_differentiable_and_modes_are_checked(clip_folder):
    r = load_reward("pickscore", checkpoint=clip_folder, preprocess="exact")
    with pytest.raises(RewardInputError, match="preprocess='exact'.*preprocess='fast'"):
        r.score(torch.rand(1, 3, 32, 32, requires_grad=True), PROMPTS[:1], differentiable=True)
    with pytest.raises(ValueError, match="preprocess must be one of fast, exact, got 'pil'"):
        load_reward("pickscore", checkpoint=clip_folder, preprocess="pil")
    with pytest.raises(ValueError, match="shapes-oracle.*no preprocess='exact' option"):
        load_reward("shapes-oracle", preprocess="exact")


def test_score_command_preprocess_exact(clip_folder, tmp_path):
    from diffalign.cli import main

    imgs = _odd_images(3)
    for i, im in enumerate(imgs):
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "p.txt").write_text("a photo of a dog\n")
    out = tmp_path / "s.json"
    assert main(["score", "--reward", "pickscore", "--checkpoint", str(clip_folder), "--preprocess", "exact",
                 "--prompts", str(tmp_path / "p.txt"), *[str(tmp_path / f"{i}.png") for i in range(len(imgs))],
                 "--out", str(out)]) == 0
    got = torch.tensor([r["score"] for r in json.loads(out.read_text())])
    want = load_reward("pickscore", checkpoint=clip_folder, preprocess="exact").score(imgs, "a photo of a dog")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
