"""The AudioLDM2 family: ``AudioLDM2UNet2DConditionModel`` (ε or v, DDPM timesteps — the UNet family's maths) over
VAE latents of a log-mel spectrogram, decoded to a waveform by a ``SpeechT5HifiGan`` vocoder.

Conditioning is a stack, as in diffusers' ``AudioLDM2Pipeline``: the CLAP text embedding and the second encoder's
states (Flan-T5 for text-to-audio/music; the text encoder of a ``VitsModel`` reading a transcript for the speech
checkpoints) are projected by ``AudioLDM2ProjectionModel``, and GPT-2 continues that sequence for
``max_new_tokens`` (8) steps, each new hidden state fed back as the next input ("AudioMAE" features). The UNet
cross-attends to those generated states and to the second encoder's states (masked).

Two deliberate differences from the pipeline, both so a prompt's conditioning does not depend on its batch-mates:
GPT-2 positions count only unmasked tokens (the pipeline pads every prompt to the longest in the batch, which shifts
positions for the shorter ones; for a batch of one the two agree exactly), and the unconditional branch is the
empty prompt encoded on its own (the pipeline pads it to the positive prompt's length). Second-encoder states are
padded to a fixed ``max_text_length`` with mask 0 so branches stack; masked keys change nothing.

Speech checkpoints: a prompt is ``"description || transcript"``; a prompt without ``||`` is all transcript (empty
description). Their unconditional branch is the pipeline's: empty CLAP description, zero VITS states and mask.
Released speech tokenizers phonemize, which needs the ``phonemizer`` package and espeak-ng installed.

``encode_media`` computes AudioLDM2's log-mel (|STFT| with a Hann window, reflect padding of (n_fft − hop)/2,
Slaney mel filters, log(max(x, 1e-5))) with ``torch.stft`` and encodes it with the VAE. It is the inverse of
``decode`` only as far as the architecture allows: the HiFi-GAN vocoder is a learned, not an exact, inverse of the
mel transform, so encode(decode(z)) ≈ z only for a well-trained vocoder and VAE.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from diffalign.generators.audio_stable import _give_adapter_methods
from diffalign.generators.base import Conditioning
from diffalign.generators.family_parts import load_part, read_settings, save_family
from diffalign.generators.loading import read_model_index
from diffalign.generators.text import TextConditioner
from diffalign.generators.unet import UNetGenerator

TRANSCRIPT_SEPARATOR = "||"
#: the phoneme id the pipeline writes over the first padding id of a VITS sequence (its end-of-text token)
VITS_END_ID = 182
LOG_FLOOR = 1e-5
_SETTINGS = ("audio_length_in_s", "max_new_tokens", "max_text_length", "mel")
_MEL_KEYS = ("n_fft", "win_length", "fmin", "fmax")


# --- log-mel features -------------------------------------------------------------------------------------------

def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    lin = f / (200.0 / 3)
    log = 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27)
    return torch.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    lin = m * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27) * (m - 15.0))
    return torch.where(m >= 15.0, log, lin)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """Triangular Slaney-normalised filters [n_mels, n_fft // 2 + 1] (the filters AudioLDM2's features use)."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = _hz_to_mel(torch.tensor(float(fmin), dtype=torch.float64)), _hz_to_mel(torch.tensor(float(fmax),
                                                                                                 dtype=torch.float64))
    edges = _mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    widths = edges.diff()
    ramps = edges[:, None] - freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0)
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


class LogMel(nn.Module):
    """Waveforms [B, T] -> log-mel [B, frames, n_mels], one frame per ``hop`` samples (the vocoder's upsampling)."""

    def __init__(self, sample_rate: int, n_mels: int, hop: int, n_fft: int = 1024, win_length: int | None = None,
                 fmin: float = 0.0, fmax: float | None = None):
        super().__init__()
        win_length = int(win_length or n_fft)
        fmax = float(min(8000.0, sample_rate / 2) if fmax is None else fmax)
        if not hop <= win_length <= n_fft:
            raise ValueError(f"log-mel settings: need hop ({hop}) <= win_length ({win_length}) <= n_fft ({n_fft})")
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ValueError(f"log-mel settings: need 0 <= fmin ({fmin}) < fmax ({fmax}) <= sample_rate / 2")
        self.sample_rate, self.n_mels, self.hop, self.n_fft, self.win_length = sample_rate, n_mels, hop, n_fft, win_length
        self.fmin, self.fmax = float(fmin), fmax
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    def settings(self) -> dict[str, Any]:
        return {"n_fft": self.n_fft, "win_length": self.win_length, "fmin": self.fmin, "fmax": self.fmax}

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = (self.n_fft - self.hop) // 2
        if waveform.shape[-1] <= pad:
            raise ValueError(f"waveform of {waveform.shape[-1]} samples is too short for the log-mel's reflect padding "
                             f"of {pad} (n_fft {self.n_fft}, hop {self.hop})")
        x = F.pad(waveform.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, self.n_fft, hop_length=self.hop, win_length=self.win_length, window=self.window,
                          center=False, return_complex=True).abs()  # [B, n_fft//2+1, frames]
        mel = torch.matmul(self.filters, spec)
        return torch.log(mel.clamp(min=LOG_FLOOR)).transpose(1, 2)


# --- conditioning ----------------------------------------------------------------------------------------------

class AudioLDM2Conditioner(TextConditioner):
    """CLAP + (T5 | VITS) -> projection -> GPT-2 generated states. ``hidden`` holds the generated states; ``extra``
    the second encoder's states padded to ``max_text_length`` (``text_states``) and their mask (``text_mask``)."""

    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "projection_model", "language_model")

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 projection_model: nn.Module, language_model: nn.Module, max_new_tokens: int | None = None,
                 max_text_length: int | None = None):
        super().__init__()
        if not hasattr(text_encoder, "get_text_features"):
            raise ValueError(f"AudioLDM2 text_encoder must be a CLAP model with get_text_features (ClapModel); got "
                             f"{type(text_encoder).__name__}")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.projection_model = projection_model.requires_grad_(False).eval()
        self.language_model = language_model.requires_grad_(False).eval()
        self.speech = getattr(text_encoder_2.config, "model_type", None) == "vits"
        pcfg = projection_model.config
        if self.speech and pcfg.use_learned_position_embedding:
            fixed = int(pcfg.max_seq_length)  # the learned positions fix the VITS sequence length
            if max_text_length is not None and int(max_text_length) != fixed:
                raise ValueError(f"max_text_length={max_text_length}: this speech checkpoint's projection model has "
                                 f"learned positions for exactly {fixed} phoneme tokens")
            max_text_length = fixed
        self.max_text_length = int(max_text_length or tokenizer_2.model_max_length)
        if self.max_text_length > 4096:
            raise ValueError(f"tokenizer_2 has no usable model_max_length ({self.max_text_length}); pass "
                             "max_text_length= or set it in the folder's _diffalign_sampling settings")
        n = max_new_tokens or getattr(language_model.config, "max_new_tokens", None) or 8
        self.max_new_tokens = int(n)

    # the pieces ---------------------------------------------------------------------------------------------
    def _clap(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt")
        out = self.text_encoder.get_text_features(tok.input_ids.to(self.device),
                                                  attention_mask=tok.attention_mask.to(self.device))
        return getattr(out, "pooler_output", out)[:, None, :]

    def _t5(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer_2(texts, padding=True, max_length=self.max_text_length, truncation=True,
                               return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        return self.text_encoder_2(ids, attention_mask=mask)[0], mask

    def _vits(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer_2(texts, padding="max_length", max_length=self.max_text_length, truncation=True,
                               return_tensors="pt")
        ids, mask = tok.input_ids.clone(), tok.attention_mask.clone()
        # as the pipeline does: the first padding id becomes the end-of-text phoneme and is attended to
        for row in range(ids.shape[0]):
            zeros = (ids[row] == 0).nonzero()
            if len(zeros):
                ids[row, zeros[0, 0]], mask[row, zeros[0, 0]] = VITS_END_ID, 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.text_encoder_2.text_encoder(ids, attention_mask=mask, padding_mask=mask.unsqueeze(-1))[0]
        return states, mask

    def generate(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GPT-2 continues the projected sequence for ``max_new_tokens`` steps, each last hidden state becoming the
        next input embedding. Positions count unmasked tokens only (so padding never shifts them)."""
        mask = mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                                  output_hidden_states=True, return_dict=True)
        new = [out.hidden_states[-1][:, -1:]]
        nxt = mask.sum(-1, keepdim=True)
        for _ in range(self.max_new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self.language_model(inputs_embeds=new[-1], attention_mask=mask, position_ids=nxt,
                                      past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True,
                                      return_dict=True)
            new.append(out.hidden_states[-1][:, -1:])
            nxt = nxt + 1
        return torch.cat(new, dim=1)

    def _pad(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to ``max_text_length``; masked states are zeroed (never attended to, but then independent of how
        far the batch was padded)."""
        extra = self.max_text_length - states.shape[1]
        states = states * mask.unsqueeze(-1).to(states.dtype)
        return F.pad(states, (0, 0, 0, extra)), F.pad(mask.long(), (0, extra))

    def _assemble(self, clap: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        proj = self.projection_model(hidden_states=clap, hidden_states_1=states,
                                     attention_mask=mask.new_ones(clap.shape[:2]), attention_mask_1=mask)
        generated = self.generate(proj.hidden_states, proj.attention_mask)
        states, mask = self._pad(states, mask)
        return Conditioning(hidden=generated, extra={"text_states": states, "text_mask": mask})

    # the conditioner ------------------------------------------------------------------------------------------
    @staticmethod
    def split_speech_prompt(prompt: str) -> tuple[str, str]:
        """``"description || transcript"`` -> (description, transcript); no separator: all transcript."""
        if TRANSCRIPT_SEPARATOR in prompt:
            description, transcript = prompt.split(TRANSCRIPT_SEPARATOR, 1)
            return description.strip(), transcript.strip()
        return "", prompt.strip()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        if self.speech:
            parts = [self.split_speech_prompt(p) for p in prompts]
            clap = self._clap([d for d, _ in parts])
            states, mask = self._vits([t for _, t in parts])
        else:
            clap = self._clap(prompts)
            states, mask = self._t5(prompts)
        return self._assemble(clap, states, mask)

    @torch.no_grad()
    def null(self, batch: int) -> Conditioning:
        """The empty prompt; for speech the pipeline's negative: zero VITS states with an all-zero mask."""
        if not self.speech:
            return self([""] * batch)
        clap = self._clap([""] * batch)
        width = self.text_encoder_2.config.hidden_size
        states = torch.zeros(batch, self.max_text_length, width, device=self.device, dtype=clap.dtype)
        return self._assemble(clap, states, torch.zeros(batch, self.max_text_length, dtype=torch.long,
                                                        device=self.device))


# --- the generator ---------------------------------------------------------------------------------------------

class AudioLDM2Generator(UNetGenerator):
    family = "audioldm2"
    modality = "audio"

    def __init__(self, unet, scheduler, conditioner: AudioLDM2Conditioner, vae, vocoder, feature_extractor=None,
                 audio_length_in_s: float | None = None, mel: dict | None = None,
                 class_name: str = "AudioLDM2Pipeline"):
        _give_adapter_methods(unet)
        super().__init__(unet, scheduler, conditioner, vae=vae, class_name=class_name)
        self.scheduler = scheduler  # saved as given (the released folders ship a DDIMScheduler)
        self.vocoder = vocoder.requires_grad_(False).eval()
        self.feature_extractor = feature_extractor
        vcfg = vocoder.config
        self.hop = int(math.prod(vcfg.upsample_rates))
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        n_mels = int(vcfg.model_in_dim)
        if n_mels % self.vae_scale:
            raise ValueError(f"the vocoder's {n_mels} mel bins are not divisible by the VAE scale factor "
                             f"{self.vae_scale}")
        unknown = set(mel or {}) - set(_MEL_KEYS)
        if unknown:
            raise ValueError(f"unknown log-mel setting(s) {sorted(unknown)}; expected some of {list(_MEL_KEYS)}")
        self.log_mel = LogMel(int(vcfg.sampling_rate), n_mels, self.hop, **(mel or {}))
        default_s = (unet.config.sample_size or 1) * self.vae_scale * self.hop / self.sample_rate
        self.audio_length_in_s = float(audio_length_in_s or default_s)
        frames = round(self.audio_length_in_s * self.sample_rate / self.hop)
        if frames < 1:
            raise ValueError(f"audio_length_in_s={self.audio_length_in_s} is shorter than one mel frame")
        self.latent_frames = -(-frames // self.vae_scale)
        self.num_samples = round(self.audio_length_in_s * self.sample_rate)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def speech(self) -> bool:
        return self.conditioner.speech

    def null_conditioning(self, batch: int) -> Conditioning:
        return self.conditioner.null(batch).to(self.device)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.denoiser.config.in_channels, self.latent_frames, self.log_mel.n_mels // self.vae_scale)

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        return self.call_denoiser(xt, t, encoder_hidden_states=cond.hidden.to(xt.dtype),
                                  encoder_hidden_states_1=cond.extra["text_states"].to(xt.dtype),
                                  encoder_attention_mask_1=cond.extra["text_mask"]).sample

    # --- media: waveform [B, 1, T] -------------------------------------------------------------------------------
    def decode_mel(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Latents -> log-mel [B, 1, frames, n_mels] (the VAE's output, the vocoder's input)."""
        with torch.set_grad_enabled(differentiable):
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        mel = self.decode_mel(latents, differentiable)
        with torch.set_grad_enabled(differentiable):
            audio = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype))
        if audio.dim() == 1:
            audio = audio.unsqueeze(0)
        return audio[:, : self.num_samples].float().unsqueeze(1)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, 1, T] (or [B, T]) at ``sample_rate`` -> latents: log-mel (one frame per hop; the clip's
        own length, never cropped), padded with silence (log 1e-5) to a whole number of VAE-downsampled frames,
        then the VAE posterior mean × scaling factor. Approximate inverse of ``decode`` only (the vocoder is not
        exactly invertible)."""
        if media.dim() == 3 and media.shape[1] == 1:
            media = media[:, 0]
        if media.dim() != 2:
            raise ValueError(f"AudioLDM2 encode_media takes mono waveforms [B, 1, T]; got {tuple(media.shape)}")
        mel = self.log_mel(media.to(self.device))  # [B, frames, n_mels]; log_mel moves with the generator
        extra = -mel.shape[1] % self.vae_scale
        mel = F.pad(mel, (0, 0, 0, extra), value=math.log(LOG_FLOOR))
        with torch.no_grad():
            lat = self.vae.encode(mel.unsqueeze(1).to(self.vae.dtype)).latent_dist.mean
        return (lat * self.vae.config.scaling_factor).to(self.dtype)

    # --- persistence ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "AudioLDM2Generator":
        path = Path(path)
        index = read_model_index(path)
        settings = {**read_settings(index), **kwargs}
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"{path}: unknown AudioLDM2 setting(s) {sorted(unknown)}; expected some of "
                             f"{list(_SETTINGS)}")
        part = {name: load_part(path, name, index, required=True) for name in (
            "unet", "scheduler", "vae", "vocoder", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "projection_model", "language_model")}
        conditioner = AudioLDM2Conditioner(
            part["tokenizer"], part["text_encoder"], part["tokenizer_2"], part["text_encoder_2"],
            part["projection_model"], part["language_model"], max_new_tokens=settings.get("max_new_tokens"),
            max_text_length=settings.get("max_text_length"))
        return cls(part["unet"], part["scheduler"], conditioner, part["vae"], part["vocoder"],
                   feature_extractor=load_part(path, "feature_extractor", index),
                   audio_length_in_s=settings.get("audio_length_in_s"), mel=settings.get("mel"),
                   class_name=index.get("_class_name", "AudioLDM2Pipeline"))

    def save_pretrained(self, path: str | Path) -> None:
        components = {"unet": self.denoiser, "scheduler": self.scheduler, "vae": self.vae, "vocoder": self.vocoder,
                      "feature_extractor": self.feature_extractor}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        settings = {"audio_length_in_s": self.audio_length_in_s, "max_new_tokens": self.conditioner.max_new_tokens,
                    "max_text_length": self.conditioner.max_text_length, "mel": self.log_mel.settings()}
        save_family(Path(path), self.class_name, components, settings)
