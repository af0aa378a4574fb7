"""3D generators behind the seam: Shap-E (a ``PriorTransformer`` denoising implicit-function latents, rendered to
views and a mesh by ``ShapERenderer``) and the multi-view image setting (V views of one asset generated as a batch
by a UNet conditioned on each view's camera), so the 3D rewards score both as [B, V, 3, H, W].

Shap-E's Heun/Karras sampler is written in variance-exploding form, but its model input x/√(σ²+1) with
σ² = (1 − ᾱ)/ᾱ is the DDPM x_t = √ᾱ·x0 + √(1−ᾱ)·ε and its output is x̂0 ("sample" prediction). So both settings
are the UNet family's DDIM maths (log-densities, inversion) with their own layout and decode.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import HeunDiscreteScheduler

from diffalign.generators.base import Conditioning, Generator
from diffalign.generators.family_parts import load_part, read_settings, save_family, set_ddpm_buffers
from diffalign.generators.loading import read_model_index
from diffalign.generators.text import CLIPConditioner, TextConditioner, tokenize_padded
from diffalign.generators.unet import UNetGenerator

CAMERA_CONFIG = "config.json"


# --- Shap-E ------------------------------------------------------------------------------------------------------
class ShapEConditioner(TextConditioner):
    """CLIP projected text embedding, unit-normalised then scaled by √dim, as the Shap-E pipeline feeds the prior;
    the unconditional branch is the zero vector (not the empty prompt)."""

    components = ("tokenizer", "text_encoder")

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        emb = self.text_encoder(tokenize_padded(self.tokenizer, prompts, self.device)).text_embeds
        emb = emb / torch.linalg.norm(emb, dim=-1, keepdim=True) * math.sqrt(emb.shape[-1])
        return Conditioning(hidden=emb.unsqueeze(1), pooled=emb)


class ShapEGenerator(UNetGenerator):
    """x0 = latents [B, num_embeddings, embedding_dim] (the implicit function's parameters); media = the
    renderer's 20 pan views [B, 20, 3, S, S]. ``encode_media`` takes latents only: Shap-E ships no image
    encoder, so preference data for it stores ``sample(...).latents`` (views cannot be mapped back)."""

    family = "shap_e"
    modality = "3d"
    prediction_type = "sample"
    capability_gaps = {
        "differentiable_decode": "diffusers' ShapERenderer.decode_to_image renders under torch.no_grad, so no "
                                 "reward gradient reaches the latents",
        "scored_pair_media": "Shap-E preference pairs store latents (it has no image encoder to map views back), "
                             "which no reward model scores",
    }

    def __init__(self, prior, scheduler, conditioner: ShapEConditioner, renderer, class_name: str = "ShapEPipeline",
                 *, frame_size: int = 64, ray_samples: tuple[int, int] = (64, 128), mesh_grid_size: int = 128):
        Generator.__init__(self)  # UNetGenerator's sampler/inversion are reused; its DDPM set-up is not
        self.denoiser = prior
        self.conditioner = conditioner
        self.renderer = renderer.requires_grad_(False).eval()
        self.train_scheduler = scheduler
        self.class_name = class_name
        self.frame_size = int(frame_size)
        self.ray_samples = (int(ray_samples[0]), int(ray_samples[1]))  # (coarse, fine) samples per ray
        self.mesh_grid_size = int(mesh_grid_size)
        set_ddpm_buffers(self, HeunDiscreteScheduler.from_config(scheduler.config).alphas_cumprod)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.conditioner.encode(prompts).to(self.device)

    def null_conditioning(self, batch: int) -> Conditioning:
        cond = self.encode([""] * batch)
        return Conditioning(hidden=torch.zeros_like(cond.hidden), pooled=torch.zeros_like(cond.pooled))

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.num_embeddings, cfg.embedding_dim)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        out = self.call_denoiser(xt, timestep=t, proj_embedding=cond.pooled.to(xt.dtype)).predicted_image_embedding
        return out[..., : xt.shape[-1]]

    def _split(self, xt: torch.Tensor, a: torch.Tensor, prediction: torch.Tensor):
        x0 = prediction
        return x0, (xt - a.sqrt() * x0) / (1 - a).clamp(min=1e-12).sqrt()

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return prediction

    def _ddim_grid(self, steps: int) -> tuple[list[int], float]:
        return torch.linspace(self.num_train_timesteps - 1, 0, steps).round().long().tolist(), 1.0

    # --- media ------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Latents -> the renderer's 20 pan views [B, 20, 3, S, S] in [0, 1] (S = ``frame_size``)."""
        if differentiable:
            raise ValueError(f"Shap-E decode cannot keep a graph: {self.capability_gaps['differentiable_decode']}")
        size = self.frame_size
        rays = 20 * size * size
        views = []
        for lat in latents:
            img = self.renderer.decode_to_image(lat[None].float(), lat.device, size=size,
                                                ray_batch_size=min(4096, rays) if rays % 4096 == 0 or rays < 4096
                                                else size * size, n_coarse_samples=self.ray_samples[0],
                                                n_fine_samples=self.ray_samples[1])
            views.append(img.permute(0, 3, 1, 2).clamp(0, 1))
        return torch.stack(views)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        if tuple(media.shape[1:]) != self.latent_shape(1)[1:]:
            raise ValueError(f"Shap-E encode_media takes latents [B, {', '.join(map(str, self.latent_shape(1)[1:]))}] "
                             f"(store sample(...).latents as the preference media); got {tuple(media.shape)} — "
                             "rendered views cannot be mapped back to latents: Shap-E has no image encoder")
        return media.to(self.device, self.dtype)

    def mesh(self, latent: torch.Tensor):
        """One latent [N, D] -> ``MeshDecoderOutput`` (verts, faces, vertex colours) by marching cubes."""
        try:
            return self.renderer.decode_to_mesh(latent[None].float(), latent.device, grid_size=self.mesh_grid_size)
        except ValueError as exc:  # diffusers fails inside texture sampling when marching cubes found nothing
            if "non-empty list" not in str(exc):
                raise
            from diffalign.media import MediaError

            raise MediaError("this latent's signed distance field has no surface inside the grid: no mesh to "
                             "export (the views may still render)") from exc

    def export_mesh(self, latent: torch.Tensor, path: str | Path) -> Path:
        """Write one latent's mesh as .obj (vertex colours) or .glb — both load in ``gr.Model3D``."""
        from diffalign.media_io import save_mesh

        m = self.mesh(latent)
        ch = m.vertex_channels
        colours = torch.stack([ch["R"], ch["G"], ch["B"]], dim=-1) if all(k in ch for k in "RGB") else None
        return save_mesh(m.verts, m.faces, path, colours=colours)

    # --- persistence ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ShapEGenerator":
        path = Path(path)
        index = read_model_index(path)
        conditioner = ShapEConditioner(load_part(path, "tokenizer", index, required=True),
                                       load_part(path, "text_encoder", index, required=True))
        settings = {**read_settings(index), **kwargs}
        return cls(load_part(path, "prior", index, required=True), load_part(path, "scheduler", index, required=True),
                   conditioner, load_part(path, "shap_e_renderer", index, required=True),
                   class_name=index.get("_class_name", "ShapEPipeline"), **settings)

    def save_pretrained(self, path: str | Path) -> None:
        components = {"prior": self.denoiser, "scheduler": self.train_scheduler, "shap_e_renderer": self.renderer,
                      "tokenizer": self.conditioner.tokenizer, "text_encoder": self.conditioner.text_encoder}
        settings = {"frame_size": self.frame_size, "ray_samples": list(self.ray_samples),
                    "mesh_grid_size": self.mesh_grid_size}
        save_family(Path(path), self.class_name, components, settings,
                    index_entries={"shap_e_renderer": ["shap_e", "ShapERenderer"]})


# --- multi-view images --------------------------------------------------------------------------------------------
class CameraRig:
    """V cameras on a circle around the object: azimuths evenly spaced from ``azimuth_start``, one elevation, one
    radius, looking at the origin. ``embeddings()`` are flattened 4×4 camera-to-world matrices [V, 16] — the
    camera conditioning of MVDream-style multi-view UNets (fed as ``class_labels``)."""

    def __init__(self, num_views: int = 4, elevation: float = 15.0, radius: float = 1.5, azimuth_start: float = 0.0):
        if int(num_views) < 1:
            raise ValueError(f"CameraRig num_views must be >= 1, got {num_views}")
        self.num_views, self.elevation = int(num_views), float(elevation)
        self.radius, self.azimuth_start = float(radius), float(azimuth_start)

    def config(self) -> dict:
        return {"num_views": self.num_views, "elevation": self.elevation, "radius": self.radius,
                "azimuth_start": self.azimuth_start}

    def azimuths(self) -> list[float]:
        return [self.azimuth_start + 360.0 * i / self.num_views for i in range(self.num_views)]

    def embeddings(self) -> torch.Tensor:
        mats = []
        el = math.radians(self.elevation)
        for az_deg in self.azimuths():
            az = math.radians(az_deg)
            pos = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]) * self.radius
            forward = -pos / pos.norm()
            right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
            right = right / right.norm().clamp(min=1e-8)
            up = torch.linalg.cross(right, forward)
            m = torch.eye(4)
            m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -forward, pos
            mats.append(m.reshape(-1))
        return torch.stack(mats)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CameraRig":
        file = Path(folder) / CAMERA_CONFIG
        if not file.is_file():
            raise FileNotFoundError(f"camera config not found: {file}")
        cfg = json.loads(file.read_text())
        unknown = set(cfg) - {"num_views", "elevation", "radius", "azimuth_start"}
        if unknown:
            raise ValueError(f"{file}: unknown camera keys {sorted(unknown)}")
        return cls(**cfg)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CAMERA_CONFIG + ".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2) + "\n")
        os.replace(tmp, folder / CAMERA_CONFIG)


class MultiViewGenerator(UNetGenerator):
    """A UNet whose batch axis is (asset, view): x0 [B, V, C, H, W]; every view sees its asset's prompt and its
    own camera embedding (``class_labels``, the UNet built with ``class_embed_type="projection"`` and
    ``projection_class_embeddings_input_dim=16``). Media: views [B, V, 3, H, W]."""

    family = "multiview"
    modality = "3d"

    def __init__(self, unet, scheduler, conditioner: TextConditioner, camera: CameraRig, vae=None,
                 class_name: str = "MultiViewDiffusionPipeline"):
        super().__init__(unet, scheduler, conditioner, vae=vae, class_name=class_name)
        if unet.config.class_embed_type != "projection" or unet.config.projection_class_embeddings_input_dim != 16:
            raise ValueError("multi-view UNet needs class_embed_type='projection' with "
                             "projection_class_embeddings_input_dim=16 (flattened 4×4 camera matrices); got "
                             f"{unet.config.class_embed_type!r} / {unet.config.projection_class_embeddings_input_dim}")
        self.camera = camera
        self.register_buffer("camera_embeddings", camera.embeddings(), persistent=False)

    @property
    def num_views(self) -> int:
        return self.camera.num_views

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.num_views, *super().latent_shape(1)[1:])

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, v = xt.shape[:2]
        if t.dim() == 0:
            t = t.expand(b)
        flat = xt.reshape(b * v, *xt.shape[2:])
        cams = self.camera_embeddings.to(xt.device, xt.dtype).repeat(b, 1)
        out = self.call_denoiser(flat, t.repeat_interleave(v), encoder_hidden_states=cond.repeat_interleave(v).hidden,
                                 class_labels=cams).sample
        return out.reshape(xt.shape)

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        b, v = latents.shape[:2]
        images = super().decode(latents.reshape(b * v, *latents.shape[2:]), differentiable)
        return images.reshape(b, v, *images.shape[1:])

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 5 or media.shape[1] != self.num_views or media.shape[2] != 3:
            raise ValueError(f"multi-view encode_media takes views [B, {self.num_views}, 3, H, W]; got "
                             f"{tuple(media.shape)}")
        b, v = media.shape[:2]
        lat = super().encode_media(media.reshape(b * v, *media.shape[2:]))
        return lat.reshape(b, v, *lat.shape[1:])

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MultiViewGenerator":
        path = Path(path)
        index = read_model_index(path)
        unet = load_part(path, "unet", index, required=True)
        vae = load_part(path, "vae", index)
        conditioner = CLIPConditioner(load_part(path, "tokenizer", index, required=True),
                                      load_part(path, "text_encoder", index, required=True),
                                      image_size=unet.config.sample_size * (8 if vae is not None else 1))
        return cls(unet, load_part(path, "scheduler", index, required=True), conditioner,
                   load_part(path, "camera", index, required=True), vae=vae,
                   class_name=index.get("_class_name", "MultiViewDiffusionPipeline"))

    def save_pretrained(self, path: str | Path) -> None:
        components = {"unet": self.denoiser, "scheduler": self.train_scheduler, "vae": self.vae,
                      "camera": self.camera, "tokenizer": self.conditioner.tokenizer,
                      "text_encoder": self.conditioner.text_encoder}
        save_family(Path(path), self.class_name, components, {})
