"""The shipped real-model recipes (configs/real/): each leaves its model and data paths ``???`` — loading it as
shipped is an error naming the first such key — and each trains 2 steps once those paths point at tiny random
models in the released folder layouts and tiny data files in the released data layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffalign.cli import main
from diffalign.config import REQUIRED, ConfigError, load_yaml
from diffalign.data.preference import PreferencePair, RankedList
from diffalign.data.writer import write_jsonl_folder, write_pickapic_parquet
from diffalign.media import filmstrip
from test_reward_training import OC_CFG, _from_config, files  # noqa: F401  (files: the tiny CLIP fixture)
from tiny_models import tiny_clip_text, tiny_clip_tokenizer, tiny_sd3_folder, tiny_sd_folder, tiny_vae

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "configs" / "real"
RECIPES = sorted(p.name for p in REAL.glob("*.yaml"))
PROMPTS = ["low", "wider", "newer", "lowest"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: these recipes train in bf16,
    so the state is reset around each test (before, for what ran earlier; after, for what runs next)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _yaml(value) -> str:
    """An override value as YAML reads it back (``no`` would read as false)."""
    return value if isinstance(value, str) and value.startswith("{") else json.dumps(
        str(value) if isinstance(value, Path) else value)


def _required_keys(node, prefix=""):
    """Dotted keys a recipe leaves ``???``, in file order."""
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _required_keys(v, key + ".")
        elif v == REQUIRED:
            out.append(key)
    return out


def test_every_family_has_a_recipe():
    assert {"sd15_dpo_pickapic.yaml", "sdxl_dpo_lora_pickapic.yaml", "sd15_smpo_pickapic.yaml",
            "sd15_inpo_pickapic.yaml", "sd35_flow_dpo_lora.yaml", "flux_flow_dpo_lora.yaml",
            "wan_flow_dpo_video.yaml", "reward_hpsv2_hpdv2.yaml", "sd15_self_npo.yaml",
            "sd35_flow_grpo_pickscore.yaml", "sd35_diffusion_nft_pickscore.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_names_its_missing_paths(name, tmp_path, capsys):
    raw = load_yaml(REAL / name)
    keys = _required_keys(raw)
    assert any(k.endswith("path") or k in ("data", "checkpoint") for k in keys), keys
    assert main(["train", str(REAL / name)]) == 2
    err = capsys.readouterr().err
    assert name in err and any(f"missing required key {k!r}" in err for k in keys), err
    # with every other key filled, the one left is named
    for left in keys:
        sets = [f"{k}={tmp_path}" for k in keys if k != left]
        assert main(["train", str(REAL / name)] + [a for s in sets for a in ("--set", s)]) == 2
        assert f"missing required key {left!r}" in capsys.readouterr().err


# --- tiny models in the released layouts --------------------------------------------------------------------------
def tiny_sdxl_folder(folder: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffalign.generators.loading import save_components

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                transformer_layers_per_block=1)
    tok = tiny_clip_tokenizer(folder.parent / "sdxl_tok")
    save_components(folder, "StableDiffusionXLPipeline", {
        "unet": unet, "scheduler": DDPMScheduler(beta_schedule="scaled_linear"), "vae": tiny_vae(),
        "tokenizer": tok, "text_encoder": tiny_clip_text(), "tokenizer_2": tok,
        "text_encoder_2": tiny_clip_text(projection=True)})
    return folder


def _models(root: Path) -> dict[str, Path]:
    from test_generators_flux import tiny_flux_folder
    from tiny_video import tiny_wan_folder

    return {"sd15": tiny_sd_folder(root / "sd15"), "sdxl": tiny_sdxl_folder(root / "sdxl"),
            "sd3": tiny_sd3_folder(root / "sd3"), "flux": tiny_flux_folder(root / "flux"),
            "wan": tiny_wan_folder(root / "wan")}


def _pairs(n: int, sizes, seed: int, video_frames: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        if video_frames:
            c, r = (filmstrip(torch.rand(video_frames, 3, h, w, generator=g)) for _ in range(2))
        else:
            c, r = torch.rand(3, h, w, generator=g), torch.rand(3, h, w, generator=g)
        out.append(PreferencePair(PROMPTS[i % 4], c, r, label=1.0, id=str(i)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, files):  # noqa: F811
    root = tmp_path_factory.mktemp("real")
    w = {"models": _models(root)}
    # Pick-a-Pic layout with mixed sizes (the recipe's data.resolution resizes and crops them)
    w["pickapic"] = write_pickapic_parquet(_pairs(8, [(12, 10), (10, 14), (8, 8)], 0), root / "pickapic.parquet")
    w["video"] = write_pickapic_parquet(_pairs(4, [(16, 16)], 1, video_frames=5), root / "video.parquet")
    w["prompts"] = root / "prompts.txt"
    w["prompts"].write_text("\n".join(PROMPTS) + "\n")
    g = torch.Generator().manual_seed(2)
    w["captioned"] = root / "captioned"
    write_jsonl_folder([RankedList(PROMPTS[i % 4], [torch.rand(3, 8, 8, generator=g)], scores=[0.0])
                        for i in range(6)], w["captioned"])
    # a PickScore folder in the released layout, from a tiny random CLIP
    from rewards.train import run_reward_recipe

    pick = run_reward_recipe({"kind": "reward-model", "reward": "pickscore", "data": str(files["data"]),
                              "output_dir": str(root / "pick"), "epochs": 1, "batch_size": 32,
                              "heldout_fraction": 0.2, "progress": False,
                              "from_config": _from_config("pickscore", files)})
    w["pickscore"] = Path(pick["checkpoint"])
    # HPDv2 layout: train.json {prompt, file_path[], human_preference[]} with relative image paths
    from PIL import Image

    hpd = root / "hpdv2"
    (hpd / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        names = []
        for j in range(2):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(hpd / "images" / f"{i}_{j}.png")
            names.append(f"{i}_{j}.png")
        rows.append({"prompt": f"{PROMPTS[i % 4]} {i}", "file_path": names, "human_preference": [1, 0],
                     "user_hash": "u"})
    (hpd / "train.json").write_text(json.dumps(rows))
    w["hpdv2"], w["hpd_images"] = hpd / "train.json", hpd / "images"
    seed = run_reward_recipe({"kind": "reward-model", "reward": "hpsv2.1", "data": str(w["hpdv2"]),
                              "image_root": str(w["hpd_images"]), "data_format": "hpdv2",
                              "output_dir": str(root / "hps"), "epochs": 1, "batch_size": 32,
                              "heldout_fraction": 0.25, "progress": False, "from_config": {"arch": OC_CFG}})
    w["hps"] = Path(seed["checkpoint"])
    return w


# recipe -> (model, data, extra overrides for the tiny world)
GENERATOR_RECIPES = {
    "sd15_dpo_pickapic.yaml": ("sd15", "pickapic", {"data.resolution": 8}),
    "sdxl_dpo_lora_pickapic.yaml": ("sdxl", "pickapic", {"data.resolution": 8}),
    "sd15_smpo_pickapic.yaml": ("sd15", "pickapic", {"data.resolution": 8}),
    "sd15_inpo_pickapic.yaml": ("sd15", "pickapic", {"data.resolution": 8}),
    "sd35_flow_dpo_lora.yaml": ("sd3", "pickapic", {"data.resolution": 8}),
    "flux_flow_dpo_lora.yaml": ("flux", "pickapic", {"data.resolution": 8}),
    "wan_flow_dpo_video.yaml": ("wan", "video", {}),
    "sd15_self_npo.yaml": ("sd15", "captioned", {}),
    # online: prompts instead of data, a few tiny rollouts per round
    "sd35_flow_grpo_pickscore.yaml": ("sd3", "prompts", {"method.samples_per_prompt": 2, "method.sample_steps": 3}),
    "sd35_diffusion_nft_pickscore.yaml": ("sd3", "prompts", {"method.samples_per_prompt": 2,
                                                             "method.sample_steps": 3}),
}


@pytest.mark.parametrize("name", sorted(GENERATOR_RECIPES))
def test_recipe_trains_two_steps_on_tiny_models(name, world, tmp_path):
    model, data, extra = GENERATOR_RECIPES[name]
    raw = load_yaml(REAL / name)
    fill = {"model.path": world["models"][model], "data.path": world[data], "data.prompts": world["prompts"],
            "method.reward_checkpoint": world.get("pickscore")}
    keys = _required_keys(raw)
    assert set(keys) <= set(fill), keys
    # the recipe's own dtype, except fp16 (CPU kernels lack some fp16 ops): bf16 takes its place
    dtype = "bf16" if raw["model"].get("dtype") == "fp16" else raw["model"].get("dtype", "fp32")
    overrides = {**{k: str(fill[k]) for k in keys}, "output_dir": str(tmp_path / "out"),
                 "train.max_train_steps": 2, "train.gradient_accumulation_steps": 1, "train.train_batch_size": 2,
                 "train.mixed_precision": "no" if dtype == "fp32" else dtype, "train.device": "cpu", "train.report_to": "none",
                 "train.checkpointing_steps": 2, "train.lr_warmup_steps": 0, "model.dtype": dtype,
                 "method.inversion_steps": 2, **extra}
    if raw["method"]["name"] not in ("smpo", "inpo"):
        del overrides["method.inversion_steps"]
    if raw["method"]["name"] == "self_npo":
        overrides["method.ddim_steps"] = 4
        overrides["method.solver_steps"] = 2
    args = ["train", str(REAL / name)] + [a for k, v in overrides.items() for a in ("--set", f"{k}={_yaml(v)}")]
    assert main(args) == 0
    out = tmp_path / "out"
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    # everything but the overridden keys is the shipped recipe's (β, lr, LoRA targets, …)
    assert saved["method"]["name"] == raw["method"]["name"]
    assert saved["train"]["learning_rate"] == pytest.approx(float(raw["train"]["learning_rate"]))
    for key in ("beta", "gamma", "lora_targets"):
        if key in raw["method"]:
            assert saved["method"][key] == pytest.approx(raw["method"][key])
    if raw["model"].get("lora_rank", 8) > 0:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (out / "final" / "model_index.json").is_file()


def test_reward_recipe_trains_on_hpdv2(world, tmp_path):
    name = "reward_hpsv2_hpdv2.yaml"
    raw = load_yaml(REAL / name)
    assert set(_required_keys(raw)) == {"checkpoint", "data", "image_root"}
    overrides = {"checkpoint": world["hps"], "data": world["hpdv2"], "image_root": world["hpd_images"],
                 "output_dir": tmp_path / "out", "device": "cpu", "batch_size": 5, "heldout_fraction": 0.25,
                 "progress": False, "reward_kwargs": json.dumps({"arch": OC_CFG})}
    args = ["train", str(REAL / name)] + [a for k, v in overrides.items() for a in ("--set", f"{k}={_yaml(v)}")]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_train"] == 9 and metrics["n_heldout"] == 3  # 12 prompts, a quarter held out
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["lr"] == pytest.approx(3.3e-6) and saved["weight_decay"] == pytest.approx(0.35)


def test_loading_a_recipe_with_a_required_key_raises_config_error(tmp_path):
    from trainers.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"sd15_dpo_pickapic.yaml: missing required key 'model.path'.*--set"):
        load_recipe(REAL / "sd15_dpo_pickapic.yaml")
    recipe = load_recipe(REAL / "sd15_dpo_pickapic.yaml", [f"model.path={tmp_path}", f"data.path={tmp_path}"])
    assert recipe.method.beta == 5000.0 and recipe.train.learning_rate == pytest.approx(2.048e-5)
    assert recipe.train.gradient_accumulation_steps == 128 and recipe.data.caption_dropout == 0.2


# --- model.dtype ---------------------------------------------------------------------------------------------------
def test_model_dtype_casts_frozen_parts_and_lora_stays_fp32(world):
    from diffalign.generators.lora import add_lora
    from diffalign.generators.registry import load_generator

    gen = load_generator(world["models"]["sd15"], dtype="bf16")
    for part in (gen.denoiser, gen.vae, gen.conditioner):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, type(part).__name__
    assert gen.alphas_cumprod.dtype == torch.float32  # the schedule is not rounded to bf16
    add_lora(gen, 4)
    trainable = [p for p in gen.denoiser.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    x = gen.encode_media(torch.rand(2, 3, 8, 8))
    t = gen.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
    out = gen.predict(gen.add_noise(x, torch.randn_like(x), t), t, gen.encode(["low", "wider"]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    # as saved when no dtype is asked for
    assert next(load_generator(world["models"]["sd15"]).vae.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="model.dtype: 'float8'"):
        load_generator(world["models"]["sd15"], dtype="float8")


def test_full_finetune_with_low_precision_parts_needs_autocast(tmp_path):
    from trainers.recipe import load_recipe

    sets = [f"model.path={tmp_path}", f"data.path={tmp_path}", "model.dtype=bf16", "train.mixed_precision='no'"]
    with pytest.raises(ConfigError, match="model.dtype: bf16 .*train.mixed_precision"):
        load_recipe(REAL / "sd15_dpo_pickapic.yaml", sets)
    with pytest.raises(ConfigError, match="model.dtype: must be one of"):
        load_recipe(REAL / "sd15_dpo_pickapic.yaml", sets[:2] + ["model.dtype=int8"])
