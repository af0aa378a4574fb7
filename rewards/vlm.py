"""VLM judges over a local Qwen2-VL-family model: pointwise, pairwise and multi-dimensional.

Scores come from the answer tokens' probabilities, never from parsing sampled text: the pointwise score is the
expected value of the rating under the model's distribution over the rating labels (smooth, deterministic and
differentiable, where a parsed integer is coarse and silently fails on odd replies); the pairwise judge reads
P("1") vs P("2") in both presentation orders and averages them, so position bias cancels and swapping the two
inputs gives exactly 1 − p.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rewards.base import RewardInputError, RewardModel, RewardOutput
from rewards.vlm_pixels import Visual
from rewards.vlm_qwen import QwenVL

POINTWISE_QUESTION = ("How good is this image as a picture of \"{prompt}\"? Consider how well it matches the "
                      "description and its visual quality. Rate it on a scale from 1 to 10, where 1 is very poor "
                      "and 10 is excellent. Answer with a single number.")
POINTWISE_QUESTION_NO_PROMPT = ("How good is this image? Consider its visual quality and plausibility. Rate it "
                                "on a scale from 1 to 10, where 1 is very poor and 10 is excellent. Answer with a "
                                "single number.")
PAIRWISE_QUESTION = ("Both images were generated for the description \"{prompt}\". Which image is better, "
                     "considering how well it matches the description and its visual quality? Answer with 1 for "
                     "Image 1 or 2 for Image 2.")
PAIRWISE_QUESTION_NO_PROMPT = ("Which image is better, considering visual quality and plausibility? Answer with 1 "
                               "for Image 1 or 2 for Image 2.")
MULTIDIM_QUESTIONS = {
    "alignment": ("How well does this image match the description \"{prompt}\"? Rate it from 1 to 10, where 1 means "
                  "unrelated and 10 means every element is present and correct. Answer with a single number."),
    "coherence": ("How coherent and free of artifacts is this image (anatomy, structure, physics)? Rate it from 1 to "
                  "10, where 1 is badly distorted and 10 is flawless. Answer with a single number."),
    "style": ("How aesthetically pleasing is this image (composition, colour, lighting, detail)? Rate it from 1 to "
              "10, where 1 is ugly and 10 is stunning. Answer with a single number."),
}
SCALE_1_TO_10 = tuple(str(i) for i in range(1, 11))


def _images(media: Any, name: str) -> list[torch.Tensor]:
    from diffalign.media import as_image_batch

    batch = as_image_batch(media, reward_name=name)
    return list(batch)


def _format(template: str, prompt: str | None, name: str) -> str:
    if "{prompt}" in template:
        if prompt is None:
            raise RewardInputError(f"{name}: this question needs a text prompt per image; pass prompts=")
        return template.replace("{prompt}", prompt)
    return template


class _JudgeBase(RewardModel):
    modality = "image"
    supports_grad = True
    batch_size = 4

    def __init__(self, vlm: QwenVL, *, max_pixels: int | None = None):
        super().__init__()
        self.vlm = vlm
        self.max_pixels = max_pixels

    def visual(self, img: torch.Tensor) -> Visual:
        return Visual(img, "image", max_pixels=self.max_pixels)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, dtype: torch.dtype | None = None,
                        max_pixels: int | None = None, **kw: Any) -> "_JudgeBase":
        if path is None:
            raise FileNotFoundError(f"reward {cls.name!r} needs checkpoint=<local Qwen2-VL / Qwen2.5-VL model "
                                    "folder> (config.json, weights and tokenizer files)")
        return cls(QwenVL.from_folder(path, dtype=dtype, reward_name=cls.name), max_pixels=max_pixels, **kw)


class VLMJudge(_JudgeBase):
    """Pointwise judge: expected rating Σ_k P(label_k)·value_k, one question per dimension.

    With one question (the default) ``dims`` is empty and the score is the expected rating; with several it is
    their mean (or the ``weights``-weighted mean)."""

    name = "vlm-judge"

    def __init__(self, vlm: QwenVL, questions: Mapping[str, str] | str | None = None,
                 labels: Sequence[str] = SCALE_1_TO_10, values: Sequence[float] | None = None,
                 weights: Mapping[str, float] | None = None, *, max_pixels: int | None = None):
        super().__init__(vlm, max_pixels=max_pixels)
        if questions is None:
            questions = {"score": POINTWISE_QUESTION}
        elif isinstance(questions, str):
            questions = {"score": questions}
        self.questions = dict(questions)
        if not self.questions:
            raise ValueError(f"{self.name}: at least one question is needed")
        self.labels = tuple(labels)
        vals = [float(v) for v in (values if values is not None else self.labels)]
        if len(vals) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} labels but {len(vals)} values")
        self.register_buffer("values", torch.tensor(vals), persistent=False)
        self.dims = tuple(self.questions) if len(self.questions) > 1 else ()
        w = dict(weights or {k: 1.0 for k in self.questions})
        unknown = set(w) - set(self.questions)
        if unknown:
            raise ValueError(f"{self.name}: weights for unknown dimensions {sorted(unknown)}")
        self.weights = {k: float(w.get(k, 0.0)) for k in self.questions}

    def probabilities(self, images: Sequence[torch.Tensor], prompts: Sequence[str | None], question: str):
        samples = [self.vlm.chat([self.visual(img), _format(question, p, self.name)])
                   for img, p in zip(images, prompts)]
        return self.vlm.label_logprobs(samples, self.labels).exp()

    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        images = list(batch)
        ps: list[str | None] = list(prompts) if prompts is not None else [None] * len(images)
        per_dim = {}
        for dim, q in self.questions.items():
            if prompts is None and q == POINTWISE_QUESTION:
                q = POINTWISE_QUESTION_NO_PROMPT
            probs = self.probabilities(images, ps, q)
            per_dim[dim] = probs @ self.values.to(probs.device)
        total = sum(self.weights.values())
        scores = sum(self.weights[k] * v for k, v in per_dim.items()) / total
        return RewardOutput(scores=scores, per_dim=per_dim if self.dims else {})


class VLMMultiDimJudge(VLMJudge):
    """Pointwise judge asked one question per dimension (alignment, coherence, style by default)."""

    name = "vlm-multidim"

    def __init__(self, vlm: QwenVL, questions: Mapping[str, str] | None = None, **kw: Any):
        super().__init__(vlm, questions=dict(questions or MULTIDIM_QUESTIONS), **kw)


class VLMPairwiseJudge(_JudgeBase):
    """P(a ≻ b) from the logits of the answer tokens "1"/"2", averaged over both presentation orders:
    p = ½·(q(a, b) + 1 − q(b, a)), q(x, y) = P("1" | x shown first). ``score`` needs ``against=`` (the
    reference each image is judged against)."""

    name = "vlm-pairwise"

    def __init__(self, vlm: QwenVL, question: str | None = None, labels: Sequence[str] = ("1", "2"), *,
                 max_pixels: int | None = None):
        super().__init__(vlm, max_pixels=max_pixels)
        if len(labels) != 2:
            raise ValueError(f"{self.name}: exactly two answer labels are needed, got {list(labels)}")
        self.question = question
        self.labels = tuple(labels)

    def first_wins(self, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
                   prompts: Sequence[str | None]) -> torch.Tensor:
        """q(x, y) = P(label 1 | x is Image 1, y is Image 2), renormalised over the two labels."""
        samples = []
        for x, y, p in zip(first, second, prompts):
            q = self.question or (PAIRWISE_QUESTION if p is not None else PAIRWISE_QUESTION_NO_PROMPT)
            samples.append(self.vlm.chat(["Image 1: ", self.visual(x), "\nImage 2: ", self.visual(y), "\n",
                                          _format(q, p, self.name)]))
        return self.vlm.label_logprobs(samples, self.labels)[:, 0].exp()

    def _pair(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], prompts: Sequence[str | None]):
        # two separate passes: swapping a and b swaps them bit for bit, so p(b, a) = 1 − p(a, b)
        d = self.first_wins(a, b, prompts) - self.first_wins(b, a, prompts)
        return 0.5 + 0.5 * d

    def compare(self, media_a: Any, media_b: Any, prompts: Sequence[str] | None = None, *,
                differentiable: bool = False, **cond: Any) -> torch.Tensor:
        a, b = _images(media_a, self.name), _images(media_b, self.name)
        if len(a) != len(b):
            raise RewardInputError(f"{self.name}: {len(a)} images in a but {len(b)} in b")
        ps = list(prompts) if prompts is not None else [None] * len(a)
        if len(ps) != len(a):
            raise RewardInputError(f"{self.name}: {len(a)} pairs but {len(ps)} prompts")
        ctx = torch.enable_grad() if differentiable else torch.no_grad()
        out = []
        with ctx:
            for s in range(0, len(a), self.batch_size):
                sl = slice(s, s + self.batch_size)
                out.append(self._pair(a[sl], b[sl], ps[sl]))
        return torch.cat(out) if out else torch.zeros(0)

    def _score(self, batch: Any, prompts: list[str] | None, against: Any = None, **cond: Any) -> RewardOutput:
        if against is None:
            raise RewardInputError(f"{self.name} is a pairwise judge: use compare(a, b, prompts), or pass "
                                   "against=<reference images> to score P(image ≻ reference)")
        a = list(batch)
        b = _images(against, self.name)
        if len(b) == 1 and len(a) > 1:
            b = b * len(a)
        if len(b) != len(a):
            raise RewardInputError(f"{self.name}: {len(a)} images but {len(b)} references in against=")
        ps = list(prompts) if prompts is not None else [None] * len(a)
        return RewardOutput(scores=self._pair(a, b, ps))
