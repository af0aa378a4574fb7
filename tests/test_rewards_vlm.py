"""VLM judges over a tiny random Qwen2-VL saved to disk and loaded back through ``load_reward``."""

import pytest
import torch

from diffalign.media import MediaError
from rewards import load_reward
from rewards.base import RewardInputError
from rewards.vlm import POINTWISE_QUESTION
from rewards.vlm_qwen import QwenVL, Visual, patchify, smart_resize
from rewards.vlm_tiny import save_tiny_qwen2vl

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSIST = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def hf(folder):
    """The model and the transformers processor — the independent path the tests compare against."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(str(folder))
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder)).eval()
    return model, proc, tok


def _u8_image(h=56, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).round().to(torch.uint8)


def _hf_logits(hf, text, images):
    model, proc, _ = hf
    enc = proc(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0].float()


def test_smart_resize_and_patchify_match_processor(hf):
    _, proc, _ = hf
    assert smart_resize(56, 84, 28, 28 * 28, 28 * 28 * 16) == (56, 84)
    assert smart_resize(1000, 500, 28, 28 * 28, 28 * 28 * 16)[0] * smart_resize(1000, 500, 28, 28 * 28,
                                                                                   28 * 28 * 16)[1] <= 28 * 28 * 16
    img = _u8_image(56, 84)
    ref = proc.image_processor(images=[img], return_tensors="pt")
    x = (img.float() / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    mine, grid = patchify(x.unsqueeze(0).expand(2, -1, -1, -1), 14, 2, 2)
    assert list(ref["image_grid_thw"][0]) == list(grid)
    torch.testing.assert_close(mine, ref["pixel_values"], atol=1e-5, rtol=0)


def test_pointwise_single_token_labels_match_processor_path(folder, hf):
    labels = tuple(str(i) for i in range(1, 10))
    judge = load_reward("vlm-judge", checkpoint=folder, labels=labels)
    img, prompt = _u8_image(), "a red circle"
    got = judge.score(img.float().unsqueeze(0) / 255, [prompt])
    _, _, tok = hf
    q = POINTWISE_QUESTION.replace("{prompt}", prompt)
    logits = _hf_logits(hf, f"{SYSTEM}<|vision_start|><|image_pad|><|vision_end|>{q}{ASSIST}", [img])[-1]
    ids = [tok.convert_tokens_to_ids(tok.tokenize(lab))[0] for lab in labels]
    p = torch.softmax(logits[ids].double(), 0)
    expected = (p * torch.arange(1, 10, dtype=torch.float64)).sum()
    assert got.shape == (1,)
    torch.testing.assert_close(got.double(), expected.view(1), atol=1e-5, rtol=0)
    assert 1.0 <= float(got) <= 9.0


def test_pointwise_multi_token_labels_are_whole_answers(folder, hf):
    judge = load_reward("vlm-judge", checkpoint=folder)  # "1".."10": "10" is two tokens
    img, prompt = _u8_image(seed=3), "a dog"
    vlm = judge.vlm
    samples = [vlm.chat([Visual(img.float() / 255), POINTWISE_QUESTION.replace("{prompt}", prompt)])]
    probs = vlm.label_logprobs(samples, judge.labels).exp()[0]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # independent: log P(label tokens + <|im_end|>) by a full forward of each completed answer
    _, _, tok = hf
    q = POINTWISE_QUESTION.replace("{prompt}", prompt)
    base = f"{SYSTEM}<|vision_start|><|image_pad|><|vision_end|>{q}{ASSIST}"
    n_base = len(_hf_logits(hf, base, [img]))
    seq_lp = []
    for lab in judge.labels:
        cont = tok(lab + "<|im_end|>", add_special_tokens=False)["input_ids"]
        lp = torch.log_softmax(_hf_logits(hf, base + lab + "<|im_end|>", [img]).double(), -1)
        seq_lp.append(sum(lp[n_base - 1 + j, t] for j, t in enumerate(cont)))
    expected = torch.softmax(torch.stack(seq_lp), 0)
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=0)
    assert len(tok("10", add_special_tokens=False)["input_ids"]) == 2


def test_batched_equals_one_at_a_time_and_differentiable(folder):
    judge = load_reward("vlm-judge", checkpoint=folder)
    imgs = [torch.rand(3, 56, 56), torch.rand(3, 56, 112), torch.rand(3, 84, 56)]
    prompts = ["a cat", "a dog sitting on a mat", "x"]
    batched = judge.score(imgs, prompts)
    single = torch.cat([judge.score([im], [p]) for im, p in zip(imgs, prompts)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    x = torch.rand(2, 3, 56, 56, requires_grad=True)
    s = judge.score(x, ["a cat", "a dog"], differentiable=True)
    assert s.requires_grad
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pairwise_symmetric_and_matches_two_order_average(folder):
    judge = load_reward("vlm-pairwise", checkpoint=folder)
    a, b = torch.rand(3, 3, 56, 56), torch.rand(3, 3, 56, 56)
    prompts = ["a cat", "a dog", "a tree"]
    p_ab = judge.compare(a, b, prompts)
    p_ba = judge.compare(b, a, prompts)
    torch.testing.assert_close(p_ab + p_ba, torch.ones(3), atol=1e-6, rtol=0)
    q_ab = judge.first_wins(list(a), list(b), prompts)
    q_ba = judge.first_wins(list(b), list(a), prompts)
    torch.testing.assert_close(p_ab, 0.5 * (q_ab + 1 - q_ba), atol=1e-6, rtol=0)
    assert ((p_ab > 0) & (p_ab < 1)).all()
    assert not torch.allclose(q_ab, 1 - q_ba, atol=1e-4)  # the model does have a position bias to cancel
    torch.testing.assert_close(judge.score(a, prompts, against=b), p_ab, atol=1e-6, rtol=0)
    with pytest.raises(RewardInputError, match="pairwise"):
        judge.score(a, prompts)
    x = a.clone().requires_grad_(True)
    judge.compare(x, b, prompts, differentiable=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_multidim_dims_and_mean(folder):
    judge = load_reward("vlm-multidim", checkpoint=folder)
    assert judge.dims == ("alignment", "coherence", "style")
    out = judge.score_dims(torch.rand(2, 3, 56, 56), ["a cat", "a dog"])
    assert set(out.per_dim) == set(judge.dims)
    mean = torch.stack([out.per_dim[d] for d in judge.dims]).mean(0)
    torch.testing.assert_close(out.scores, mean, atol=1e-6, rtol=0)
    assert not torch.allclose(out.per_dim["alignment"], out.per_dim["style"])


def test_errors_name_the_problem(folder, tmp_path):
    judge = load_reward("vlm-judge", checkpoint=folder)
    with pytest.raises(MediaError, match="vlm-judge"):
        judge.score(torch.rand(1, 4, 3, 56, 56), ["a video is not an image"])
    with pytest.raises(RewardInputError, match="prompt"):
        load_reward("vlm-multidim", checkpoint=folder).score(torch.rand(1, 3, 56, 56))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_reward("vlm-judge", checkpoint=tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        load_reward("vlm-judge")
    assert isinstance(judge.vlm, QwenVL)


def test_missing_weights_are_an_error_not_a_random_init(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from rewards.vlm_qwen import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sd = load_file(str(bad / "model.safetensors"))
    dropped = next(k for k in sd if k.endswith("layers.1.mlp.up_proj.weight"))
    sd.pop(dropped)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"bad.*missing keys.*layers\.1\.mlp\.up_proj\.weight"):
        load_reward("vlm-judge", checkpoint=bad)


def _flatten(segments):
    """Rendered segments -> the prompt text, each visual as the processor's placeholder."""
    from rewards.vlm_chat import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

    return "".join(s if isinstance(s, str) else (IMAGE_PLACEHOLDER if s.kind == "image" else VIDEO_PLACEHOLDER)
                   for s in segments)


def test_chat_prompt_is_the_processor_chat_template(folder, hf):
    _, proc, tok = hf
    vlm = load_reward("vlm-judge", checkpoint=folder).vlm
    img = _u8_image().float() / 255
    user = ["Image 1: ", Visual(img), "\nImage 2: ", Visual(img), "\nWhich is better?"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Image 1: "}, {"type": "image"},
                                              {"type": "text", "text": "\nImage 2: "}, {"type": "image"},
                                              {"type": "text", "text": "\nWhich is better?"}]}]
    ref = proc.apply_chat_template(messages, chat_template=tok.chat_template, add_generation_prompt=True,
                                   tokenize=False)
    assert ref.startswith(SYSTEM) and ref.endswith(ASSIST)  # the template renders the Qwen2-VL format
    got = vlm.chat(user)
    assert _flatten(got) == ref
    assert [type(s).__name__ for s in got].count("Visual") == 2
    assert _flatten(vlm.chat(["hi"], assistant_prefix="Answer: ")) == proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], chat_template=tok.chat_template,
        add_generation_prompt=True, tokenize=False) + "Answer: "


def test_chat_follows_the_checkpoint_template_not_a_fixed_string(folder, hf, tmp_path):
    """A checkpoint whose template differs (its own system prompt, numbered pictures) is prompted its way, and
    the score equals the processor path fed that template's text."""
    import shutil

    from transformers import AutoTokenizer

    from rewards.vlm_chat import QWEN2VL_CHAT_TEMPLATE

    custom = (QWEN2VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You rate pictures.")
              .replace("{% if part['type'] == 'image' %}", "{% if part['type'] == 'image' %}{{ 'Picture: ' }}"))
    own = tmp_path / "own"
    shutil.copytree(folder, own)
    tok = AutoTokenizer.from_pretrained(str(own))
    tok.chat_template = custom
    tok.save_pretrained(str(own))
    labels = tuple(str(i) for i in range(1, 10))
    judge = load_reward("vlm-judge", checkpoint=own, labels=labels)
    img, prompt = _u8_image(seed=5), "a red circle"
    q = POINTWISE_QUESTION.replace("{prompt}", prompt)
    text = _flatten(judge.vlm.chat([Visual(img.float() / 255), q]))
    assert text.startswith("<|im_start|>system\nYou rate pictures.<|im_end|>\n<|im_start|>user\nPicture: ")
    logits = _hf_logits(hf, text, [img])[-1]
    ids = [tok.convert_tokens_to_ids(tok.tokenize(lab))[0] for lab in labels]
    p = torch.softmax(logits[ids].double(), 0)
    expected = (p * torch.arange(1, 10, dtype=torch.float64)).sum()
    torch.testing.assert_close(judge.score(img.float().unsqueeze(0) / 255, [prompt]).double(), expected.view(1),
                               atol=1e-5, rtol=0)


def test_chat_template_without_vision_placeholders_is_an_error(folder):
    from rewards.vlm_qwen import QwenVL

    vlm = load_reward("vlm-judge", checkpoint=folder).vlm
    bare = QwenVL.from_model(vlm.model, vlm.tokenizer, chat_template="{% for m in messages %}x{% endfor %}")
    with pytest.raises(ValueError, match="vision placeholders"):
        bare.chat([Visual(torch.rand(3, 56, 56)), "q"])
    with pytest.raises(TypeError, match="text and Visual"):
        vlm.chat([[1, 2, 3]])


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.q_proj = torch.nn.Linear(6, 5)
        self.inner.v_proj = torch.nn.Linear(6, 4, bias=False)
        self.out = torch.nn.Linear(5, 3)


def test_merge_lora_uses_peft_and_equals_base_plus_scaled_delta():
    """A real saved PeftModel state dict, split and merged onto a fresh base: W = W₀ + (α/r)·B·A on the
    adapted linears, every other weight untouched, requires_grad as it was."""
    from peft import LoraConfig, get_peft_model

    from rewards.base import CheckpointError
    from rewards.vlm_checkpoint import merge_lora, split_peft_state_dict

    torch.manual_seed(0)
    rank, alpha = 2, 6.0
    peft_model = get_peft_model(_TwoLinears(), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["inner.q_proj", "inner.v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)  # lora_B starts at zero: give it a real delta
    saved = peft_model.state_dict()
    assert any(k.startswith("base_model.model.inner.q_proj.base_layer.") for k in saved)

    plain, lora = split_peft_state_dict(saved)
    reference = {k: v.clone() for k, v in plain.items()}
    assert set(plain) == {"inner.q_proj.weight", "inner.q_proj.bias", "inner.v_proj.weight", "out.weight", "out.bias"}
    assert plain["inner.q_proj.weight"] is saved["base_model.model.inner.q_proj.base_layer.weight"]
    assert set(lora) == {f"inner.{m}.lora_{x}.weight" for m in ("q_proj", "v_proj") for x in "AB"}
    fresh = _TwoLinears()
    fresh.load_state_dict(plain)
    merged = merge_lora(fresh, lora, rank=rank, alpha=alpha, source="adapter.pth")
    sd = merged.state_dict()
    assert set(sd) == set(reference)  # no peft wrappers left
    for mod in ("inner.q_proj", "inner.v_proj"):
        a, b = lora[f"{mod}.lora_A.weight"], lora[f"{mod}.lora_B.weight"]
        torch.testing.assert_close(sd[f"{mod}.weight"], reference[f"{mod}.weight"] + alpha / rank * b @ a)
        assert not torch.allclose(sd[f"{mod}.weight"], reference[f"{mod}.weight"])
    for k in ("inner.q_proj.bias", "out.weight", "out.bias"):
        torch.testing.assert_close(sd[k], reference[k], atol=0, rtol=0)
    assert all(p.requires_grad for p in merged.parameters())

    incomplete = {k: v for k, v in lora.items() if not k.startswith("inner.v_proj.lora_B")}
    with pytest.raises(CheckpointError, match=r"adapter\.pth.*inner\.v_proj.*incomplete"):
        merge_lora(_TwoLinears(), incomplete, rank=rank, alpha=alpha, source="adapter.pth")
    with pytest.raises(CheckpointError, match=r"adapter\.pth.*rank 3"):
        merge_lora(_TwoLinears(), lora, rank=3, alpha=alpha, source="adapter.pth")
    stray = {k.replace("inner.q_proj", "inner.k_proj"): v for k, v in lora.items()}
    with pytest.raises(CheckpointError, match=r"does not have: inner\.k_proj"):
        merge_lora(_TwoLinears(), stray, rank=rank, alpha=alpha, source="adapter.pth")


def test_split_modules_keep_public_names_importable():
    from rewards import audio, base, edit, threed, vlm_checkpoint, vlm_qwen, vlm_videoreward

    assert vlm_qwen.CheckpointError is base.CheckpointError is threed.CheckpointError is edit.CheckpointError
    assert vlm_videoreward.CheckpointError is base.CheckpointError
    for name in ("QwenVL", "Visual", "AnswerScorer", "DEFAULT_SYSTEM", "CLIP_MEAN", "smart_resize", "patchify",
                 "check_keys", "load_state_dict_file", "to_current_layout", "no_init", "from_pretrained_strict",
                 "read_preprocessor_config"):
        assert hasattr(vlm_qwen, name), name
    assert audio.AnswerScorer is vlm_qwen.AnswerScorer
    assert vlm_qwen.merge_lora is vlm_checkpoint.merge_lora
