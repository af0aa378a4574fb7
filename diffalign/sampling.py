"""Prompt sources and ``diffalign sample``: generate images to a folder with fixed seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence



def read_prompts(spec: str | Path) -> list[str]:
    """A toy prompt set name ("toy-train", "toy-heldout", "toy-all", or the compose world's "compose-train",
    "compose-heldout", "compose-all"), a text file (one prompt per line), or a single literal prompt."""
    text = str(spec)
    if text.startswith("toy-"):
        from diffalign.toyworld.prompts import prompt_set

        return list(prompt_set(text))
    if text.startswith("compose-") and not Path(text).suffix and not Path(text).is_file():
        from diffalign.toyworld.compose import compose_prompt_set

        return compose_prompt_set(text)
    path = Path(text)
    if path.suffix in (".txt", ".lst") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path} has no prompts")
        return prompts
    return [text]


def sample_to_folder(model: str | Path, prompts: str | Sequence[str], out: str | Path, *, lora: str | Path | None = None,
                     num_per_prompt: int = 4, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                     device: str = "cpu", attention: str = "auto") -> Path:
    """Write ``{prompt_index:03d}_{seed}.png`` per sample plus ``prompts.txt`` (line i = prompt of index i).
    ``attention``: auto | off | a backend name (``diffalign.attention.option``)."""
    from diffalign.attention import apply_attention
    from diffalign.eval import sample_grid, seeded_noise
    from diffalign.generators.registry import load_generator
    from diffalign.media import tensor_to_pil

    prompt_list = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    gen = load_generator(model, lora=lora, device=device)
    apply_attention(gen, attention, "--attention")
    seeds = list(range(seed, seed + num_per_prompt))
    images = sample_grid(gen, prompt_list, seeded_noise(gen, seeds).to(device), steps, guidance)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(prompt_list)):
        for j, s in enumerate(seeds):
            tensor_to_pil(images[i, j]).save(out / f"{i:03d}_{s}.png")
    (out / "prompts.txt").write_text("\n".join(prompt_list) + "\n")
    return out
