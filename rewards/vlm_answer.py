"""Scores read from a chat model's answer-token probabilities (never from parsing sampled text).

Shared by the vision judges (``QwenVL``) and the audio judge (``QwenAudio``): both provide ``encode`` (samples ->
padded inputs, lengths), ``hidden`` and ``lm_logits``, and hold a ``tokenizer`` and a ``_text_cache`` dict.
"""

from __future__ import annotations

from typing import Sequence

import torch


class AnswerScorer:
    """Answer-token log-probabilities for a chat model wrapper (see the module docstring for what it needs)."""

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return tid

    def text_ids(self, text: str) -> list[int]:
        if text not in self._text_cache:
            self._text_cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._text_cache[text]

    def label_logprobs(self, samples: Sequence[Sequence], labels: Sequence[str],
                       end_token: str = "<|im_end|>") -> torch.Tensor:
        """log P(answer = label_k | sample), renormalised over the K labels -> [B, K].

        Single-token labels are read from one next-token distribution. Multi-token labels ("10" splits into
        "1", "0" in Qwen's tokenizer) are scored as complete answers — label tokens plus the end-of-turn
        token, teacher-forced — so "1" and "10" do not share probability mass."""
        label_ids = [self.text_ids(lab) for lab in labels]
        if any(not ids for ids in label_ids):
            raise ValueError(f"labels {list(labels)} include one that tokenises to nothing")
        if all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(labels):
            inputs, lengths = self.encode(samples)
            h = self.hidden(inputs)
            last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
            logits = self.lm_logits(last)[:, [ids[0] for ids in label_ids]]
            return torch.log_softmax(logits, dim=-1)
        end_id = self.token_id(end_token)
        expanded, conts = [], []
        for segs in samples:
            for ids in label_ids:
                expanded.append([*segs, ids + [end_id]])
                conts.append(ids + [end_id])
        inputs, lengths = self.encode(expanded)
        h = self.hidden(inputs)
        totals = []
        for row, cont in enumerate(conts):
            start = int(lengths[row]) - len(cont)
            lp = torch.log_softmax(self.lm_logits(h[row, start - 1:start - 1 + len(cont)]), dim=-1)
            totals.append(lp[torch.arange(len(cont), device=lp.device), torch.tensor(cont, device=lp.device)].sum())
        seq = torch.stack(totals).view(len(samples), len(labels))
        return torch.log_softmax(seq, dim=-1)
