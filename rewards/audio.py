"""Audio rewards: CLAP text–audio similarity and a speech judge over an audio-language model.

Both compute their log-mel features in torch (the transformers feature extractors work in numpy), so scores are
differentiable with respect to the waveform; the features equal the extractors' for the same waveform. Two
deliberate departures from the extractors, both to keep scores deterministic and batch-independent: CLAP's
"fusion" crops of long audio are taken at fixed positions (start of the front third, centre of the middle third,
end of the back third) instead of random ones, and its ``is_longer`` flag is the clip's own (the extractor flips
a random clip to True when none is long). A waveform at another sample rate is resampled with a band-limited filter
(``diffalign.media_types.resample``: torchaudio's windowed sinc with the ``[audio]`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.media_types import Audio, as_audio_batch, resample
from rewards.base import RewardInputError, RewardModel, RewardOutput
from rewards.vlm_answer import AnswerScorer
from rewards.vlm_chat import DEFAULT_SYSTEM
from rewards.vlm_checkpoint import from_pretrained_strict

SCALE_1_TO_10 = tuple(str(i) for i in range(1, 11))


def _stft_power(w: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, periodic=True, device=w.device, dtype=w.dtype)
    spec = torch.stft(w, n_fft, hop, win_length=n_fft, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    return spec.abs() ** 2  # [freq, frames]


# --- CLAP ---------------------------------------------------------------------------------------------------------
class CLAPScore(RewardModel):
    """cos(text embedding, audio embedding) of a transformers ``ClapModel`` (× ``scale``; 1 by default, so the
    score is the plain cosine in [-1, 1]). ``score(Audio | [Audio], prompts)``."""

    name = "clap"
    modality = "audio"
    supports_grad = True
    batch_size = 16

    def __init__(self, model: Any, tokenizer: Any, feature_extractor: Any, scale: float = 1.0):
        super().__init__()
        self.model, self.tokenizer, self.scale = model.eval(), tokenizer, float(scale)
        fe = feature_extractor
        self.sampling_rate, self.hop, self.n_fft = fe.sampling_rate, fe.hop_length, fe.fft_window_size
        self.max_samples = fe.nb_max_samples
        self.fusion = fe.truncation == "fusion"
        if fe.padding not in ("repeatpad", "repeat", "pad"):
            raise ValueError(f"{self.name}: unsupported feature-extractor padding {fe.padding!r}")
        self.padding = fe.padding
        filters = fe.mel_filters if self.fusion else fe.mel_filters_slaney
        self.register_buffer("mel_filters", torch.tensor(np.asarray(filters), dtype=torch.float32), persistent=False)

    def _prepare(self, media: Any) -> list[Audio]:
        return as_audio_batch(media, reward_name=self.name, sample_rate=self.sampling_rate)

    def log_mel(self, w: torch.Tensor) -> torch.Tensor:
        """[T] -> dB mel spectrogram [frames, mels] (the extractor's ``_np_extract_fbank_features``)."""
        mel = self.mel_filters.T.to(w.dtype) @ _stft_power(w, self.n_fft, self.hop)
        return (10.0 * torch.log10(mel.clamp(min=1e-10))).T

    def features(self, audio: Audio) -> tuple[torch.Tensor, bool]:
        """One clip -> (input features [1 or 4, frames, mels], is_longer)."""
        w = resample(audio.waveform.to(self.mel_filters.device).float(), audio.sample_rate, self.sampling_rate)
        m = self.max_samples
        if w.shape[0] > m:
            if not self.fusion:  # centre crop (the extractor crops at random)
                start = (w.shape[0] - m) // 2
                return self.log_mel(w[start:start + m])[None], True
            mel = self.log_mel(w)
            chunk = m // self.hop + 1
            total = mel.shape[0]
            if chunk == total:
                return mel.expand(4, -1, -1), False
            ranges = np.array_split(np.arange(0, total - chunk + 1), 3)
            picks = (0, None, -1)  # front third: its start; middle: its centre; back: its end
            starts = [int(r[len(r) // 2] if p is None else r[p]) if len(r) else 0 for r, p in zip(ranges, picks)]
            crops = [mel[s:s + chunk] for s in starts]
            shrink = F.interpolate(mel[None, None], size=(chunk, mel.shape[1]), mode="bilinear",
                                   align_corners=False)[0, 0]
            return torch.stack([shrink, *crops]), True
        if w.shape[0] < m:
            if self.padding == "repeat":
                w = w.repeat(int(m / w.shape[0]) + 1)[:m]
            elif self.padding == "repeatpad":
                w = w.repeat(int(m / w.shape[0]))
            w = F.pad(w, (0, m - w.shape[0]))
        mel = self.log_mel(w)
        return (mel.expand(4, -1, -1) if self.fusion else mel[None]), False

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        enc = {k: v.to(self.mel_filters.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**enc))

    def audio_embeds(self, clips: Sequence[Audio]) -> torch.Tensor:
        feats, longer = zip(*(self.features(a) for a in clips))
        is_longer = torch.tensor(longer, device=self.mel_filters.device).view(-1, 1)
        return _pooled(self.model.get_audio_features(input_features=torch.stack(feats), is_longer=is_longer))

    def _score(self, batch: list[Audio], prompts: list[str] | None, **cond: Any) -> RewardOutput:
        if prompts is None:
            raise RewardInputError(f"{self.name} compares audio with text: pass one prompt per clip")
        a = F.normalize(self.audio_embeds(batch), dim=-1)
        t = F.normalize(self.text_embeds(prompts), dim=-1)
        return RewardOutput(scores=self.scale * (a * t).sum(-1))

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, scale: float = 1.0, **kw: Any) -> "CLAPScore":
        """``path``: a local transformers CLAP folder (config, weights, tokenizer, preprocessor_config.json)."""
        if path is None:
            raise FileNotFoundError("reward 'clap' needs checkpoint=<local transformers CLAP folder, e.g. a copy of "
                                    "laion/clap-htsat-unfused>")
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"clap: {path} has no config.json (pass a transformers CLAP folder)")
        model = from_pretrained_strict(ClapModel, path, **kw)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        fe = ClapFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        return cls(model, tok, fe, scale=scale)


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- speech judge -------------------------------------------------------------------------------------------------
@dataclass
class Speech:
    """A waveform segment spliced into an audio-language-model prompt."""

    waveform: torch.Tensor
    sample_rate: int


class QwenAudio(AnswerScorer, torch.nn.Module):
    """A loaded Qwen2-Audio model with a torch Whisper log-mel front end and Qwen's chat format."""

    def __init__(self, model: Any, tokenizer: Any, feature_extractor: Any, system_prompt: str | None = DEFAULT_SYSTEM):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        fe = feature_extractor
        self.sampling_rate, self.hop = fe.sampling_rate, fe.hop_length
        self.n_fft, self.n_samples = fe.n_fft, fe.n_samples
        self.register_buffer("mel_filters", torch.tensor(np.asarray(fe.mel_filters), dtype=torch.float32),
                             persistent=False)
        self.system_prompt = system_prompt
        self.audio_id = model.config.audio_token_id
        self.bos_id, self.eos_id = self.token_id("<|audio_bos|>"), self.token_id("<|audio_eos|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._text_cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> "QwenAudio":
        from transformers import AutoTokenizer, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"speech judge: {path} has no config.json (pass a local Qwen2-Audio folder)")
        model = from_pretrained_strict(Qwen2AudioForConditionalGeneration, path, dtype=dtype or torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        fe = WhisperFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        return cls(model, tok, fe)

    def log_mel(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[T] -> (Whisper log-mel [mels, n_samples / hop] of the zero-padded clip, number of valid frames)."""
        w = w[: self.n_samples]
        valid = math.ceil(w.shape[0] / self.hop)
        w = F.pad(w, (0, self.n_samples - w.shape[0]))
        mags = _stft_power(w, self.n_fft, self.hop)[:, :-1]
        log_spec = (self.mel_filters.T.to(w.dtype) @ mags).clamp(min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0, valid

    def chat(self, user: Sequence[Any]) -> list[Any]:
        head = "" if self.system_prompt is None else f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
        return [f"{head}<|im_start|>user\n", *user, "<|im_end|>\n<|im_start|>assistant\n"]

    def encode(self, samples: Sequence[Sequence[Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        device = self.mel_filters.device
        rows, feats, valid = [], [], []
        for segs in samples:
            ids: list[int] = []
            for seg in segs:
                if isinstance(seg, str):
                    ids += self.text_ids(seg)
                elif isinstance(seg, Speech):
                    w = resample(seg.waveform.to(device).float(), seg.sample_rate, self.sampling_rate)
                    mel, n = self.log_mel(w)
                    n_tok = (((n - 1) // 2 + 1) - 2) // 2 + 1
                    if n_tok < 2:
                        raise RewardInputError(f"speech judge: a clip of {w.shape[0]} samples is too short to score")
                    ids += [self.bos_id] + [self.audio_id] * n_tok + [self.eos_id]
                    feats.append(mel)
                    valid.append(n)
                else:
                    ids += list(seg)
            rows.append(ids)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        input_ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, device=device)
            mask[i, :len(r)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if feats:
            frames = feats[0].shape[1]
            inputs["input_features"] = torch.stack(feats)
            inputs["feature_attention_mask"] = (torch.arange(frames, device=device)[None]
                                                < torch.tensor(valid, device=device)[:, None]).long()
        return inputs, lengths

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.model(**inputs, use_cache=False).last_hidden_state

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return head(h.to(head.weight.dtype)).float()


POINTWISE_SPEECH = ("Audio 1 is a synthesized reading of the text: \"{prompt}\". Rate the naturalness of the speech "
                    "(prosody, pronunciation, fluency and voice quality) on a scale from 1 to 10, where 1 is very "
                    "unnatural and 10 is indistinguishable from a human. Answer with a single number.")
PAIRWISE_SPEECH = ("Output A and Output B are two synthesized readings of the text: \"{prompt}\". Which one sounds "
                   "more natural (prosody, pronunciation, fluency and voice quality)? Answer with A or B.")


def _fill(template: str, prompt: str | None, name: str) -> str:
    if prompt is None:
        raise RewardInputError(f"{name}: pass the target text of each clip as prompts=")
    return template.replace("{prompt}", prompt)


class _SpeechBase(RewardModel):
    modality = "audio"
    supports_grad = True
    batch_size = 4

    def __init__(self, alm: QwenAudio):
        super().__init__()
        self.alm = alm

    def _prepare(self, media: Any) -> list[Audio]:
        return as_audio_batch(media, reward_name=self.name, sample_rate=self.alm.sampling_rate)

    @staticmethod
    def speech(a: Audio) -> Speech:
        return Speech(a.waveform, a.sample_rate)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, dtype: torch.dtype | None = None, **kw: Any):
        if path is None:
            raise FileNotFoundError(f"reward {cls.name!r} needs checkpoint=<local Qwen2-Audio model folder>")
        return cls(QwenAudio.from_folder(path, dtype=dtype), **kw)


class SpeechJudge(_SpeechBase):
    """SpeechJudge-style pointwise naturalness: expected 1–10 rating under the answer-token probabilities."""

    name = "speech-judge"

    def __init__(self, alm: QwenAudio, question: str = POINTWISE_SPEECH, labels: Sequence[str] = SCALE_1_TO_10):
        super().__init__(alm)
        self.question, self.labels = question, tuple(labels)
        self.register_buffer("values", torch.tensor([float(x) for x in self.labels]), persistent=False)

    def _score(self, batch: list[Audio], prompts: list[str] | None, **cond: Any) -> RewardOutput:
        ps = prompts if prompts is not None else [None] * len(batch)
        samples = [self.alm.chat(["Audio 1: ", self.speech(a), "\n", _fill(self.question, p, self.name)])
                   for a, p in zip(batch, ps)]
        probs = self.alm.label_logprobs(samples, self.labels).exp()
        return RewardOutput(scores=probs @ self.values.to(probs.device))


class SpeechPairwiseJudge(_SpeechBase):
    """P(a ≻ b) in naturalness from the "A"/"B" answer logits, both presentation orders averaged (swap a and b →
    1 − p). ``score`` needs ``against=`` reference clips."""

    name = "speech-pairwise"

    def __init__(self, alm: QwenAudio, question: str = PAIRWISE_SPEECH, labels: Sequence[str] = ("A", "B")):
        super().__init__(alm)
        self.question, self.labels = question, tuple(labels)

    def first_wins(self, first: Sequence[Audio], second: Sequence[Audio], prompts: Sequence[str | None]):
        samples = [self.alm.chat(["Output A: ", self.speech(x), "\nOutput B: ", self.speech(y), "\n",
                                  _fill(self.question, p, self.name)]) for x, y, p in zip(first, second, prompts)]
        return self.alm.label_logprobs(samples, self.labels)[:, 0].exp()

    def _pair(self, a, b, prompts):
        return 0.5 + 0.5 * (self.first_wins(a, b, prompts) - self.first_wins(b, a, prompts))

    def compare(self, media_a: Any, media_b: Any, prompts: Sequence[str] | None = None, *,
                differentiable: bool = False, **cond: Any) -> torch.Tensor:
        a, b = self._prepare(media_a), self._prepare(media_b)
        if len(a) != len(b):
            raise RewardInputError(f"{self.name}: {len(a)} clips in a but {len(b)} in b")
        ps = list(prompts) if prompts is not None else [None] * len(a)
        with (torch.enable_grad() if differentiable else torch.no_grad()):
            out = [self._pair(a[s:s + self.batch_size], b[s:s + self.batch_size], ps[s:s + self.batch_size])
                   for s in range(0, len(a), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def _score(self, batch: list[Audio], prompts: list[str] | None, against: Any = None, **cond: Any) -> RewardOutput:
        if against is None:
            raise RewardInputError(f"{self.name} is a pairwise judge: use compare(a, b, prompts) or pass against=")
        ref = self._prepare(against)
        if len(ref) == 1 and len(batch) > 1:
            ref = ref * len(batch)
        if len(ref) != len(batch):
            raise RewardInputError(f"{self.name}: {len(batch)} clips but {len(ref)} references in against=")
        ps = prompts if prompts is not None else [None] * len(batch)
        return RewardOutput(scores=self._pair(batch, ref, ps))
