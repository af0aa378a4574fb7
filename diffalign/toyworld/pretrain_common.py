"""What every toy base's pretraining shares: the optimisation settings, the training loop (warm-up, clipping, EMA,
caption dropout, time budget, resumable state), the atomic pipeline-folder writer and the command line.

Each base (UNet, flow transformer, video transformer) then only says how to build its denoiser, how to draw a
training batch and its loss, and how its pipeline folder is laid out, so a fix to the loop or the state file
reaches all of them at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import pickle
import shutil
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from diffalign.atomic import atomic_path, swap_in_folder, temp_folder_beside
from diffalign.toyworld.prompts import TRAIN_PROMPTS, VOCAB
from diffalign.toyworld.text_encoder import ToyTextEncoder


@dataclass
class PretrainSettings:
    """The optimisation half of a pretraining run; each base's config adds its architecture fields. Saved in the
    state file so a run can be repeated."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 500
    log_every: int = 50
    max_minutes: float | None = None
    threads: int | None = 2
    prompts: tuple[str, ...] = field(default_factory=lambda: TRAIN_PROMPTS)


# --- components and saving -------------------------------------------------------------------------------------
def build_text_encoder(dim: int = 64) -> ToyTextEncoder:
    return ToyTextEncoder(vocab=list(VOCAB), dim=dim, max_length=4)


def write_pipeline_folder(folder: str | Path, components: dict, index: dict,
                          extra_files: dict[str, str] | None = None) -> Path:
    """Each component's ``save_pretrained`` into a temp folder beside the target, then an atomic swap, so a crash
    mid-save never leaves a half-written folder where the old one was. A hand-written README survives."""
    folder = Path(folder)
    tmp = temp_folder_beside(folder)
    try:
        tmp.mkdir()
        for name, component in components.items():
            kwargs = {"safe_serialization": True} if isinstance(component, torch.nn.Module) else {}
            component.save_pretrained(tmp / name, **kwargs)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if (folder / "README.md").is_file() and "README.md" not in (extra_files or {}):
            shutil.copy2(folder / "README.md", tmp / "README.md")
        _make_readable(tmp)
        swap_in_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _make_readable(folder: Path) -> None:
    """Temp files are created owner-only; a shipped folder must be readable by everyone."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- training --------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of parameters, with the usual warm-up so early steps are not frozen in."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, source: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, s in zip(self.module.parameters(), source.parameters()):
            e.lerp_(s.detach(), 1 - d)


#: (batch size, prompts, generator) -> (media in [0, 1], the prompt of each item)
BatchFn = Callable[[int, Sequence[str], torch.Generator], tuple[torch.Tensor, list[str]]]
#: (denoiser, text encoder, x0 in [-1, 1], prompts with dropout applied, generator) -> scalar loss
LossFn = Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor, list[str], torch.Generator], torch.Tensor]
#: (folder, EMA denoiser, EMA text encoder) -> writes the pipeline folder
SaveFn = Callable[[Path, torch.nn.Module, torch.nn.Module], Any]


def default_state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.train-state.pt"


def train_base(config: PretrainSettings, *, denoiser: torch.nn.Module, denoiser_key: str,
               text_encoder: torch.nn.Module, batch: BatchFn, loss: LossFn, save: SaveFn, out: str | Path,
               state_path: str | Path | None = None, resume: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) ``denoiser`` and the text encoder jointly and write their EMA to ``out``.

    ``config.steps`` is the total step count: resuming a 3000-step state with steps=5000 trains 2000 more. The
    state file keeps raw + EMA weights, the optimiser and the data RNG, under ``denoiser_key`` for the denoiser.
    """
    out = Path(out)
    state_path = Path(state_path) if state_path is not None else default_state_path(out)
    if config.threads:
        torch.set_num_threads(config.threads)
    params = list(denoiser.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema_model, ema_text = EMA(denoiser, config.ema_decay), EMA(text_encoder, config.ema_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step, elapsed_before = 0, 0.0

    if resume and state_path.is_file():
        try:  # tensors, state dicts and plain config values only: a state file never runs code on load
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{state_path}: not a pretraining state file this code wrote (refused to unpickle "
                             f"anything but tensors and plain values): {str(exc).splitlines()[0]}") from None
        denoiser.load_state_dict(state[denoiser_key])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_model.module.load_state_dict(state[f"ema_{denoiser_key}"])
        ema_text.module.load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        log(f"resumed from {state_path} at step {step}")

    prompts = list(config.prompts)
    n_params = sum(p.numel() for p in denoiser.parameters())
    log(f"{denoiser_key} {n_params:,} parameters; text encoder {sum(p.numel() for p in text_encoder.parameters()):,}")

    def checkpoint(final: bool) -> None:
        elapsed = elapsed_before + time.time() - start
        atomic_torch_save({
            denoiser_key: denoiser.state_dict(), "text_encoder": text_encoder.state_dict(),
            f"ema_{denoiser_key}": ema_model.module.state_dict(), "ema_text_encoder": ema_text.module.state_dict(),
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step, "elapsed_s": elapsed,
            "config": asdict(config),
        }, state_path)
        save(out, ema_model.module, ema_text.module)
        log(f"saved step {step} ({'final' if final else 'checkpoint'}, {elapsed / 60:.1f} min trained) -> {out} "
            f"(state {state_path})")

    start = time.time()
    denoiser.train(), text_encoder.train()
    running, seen, last_log = 0.0, 0, start
    while step < config.steps:
        if config.max_minutes is not None and (time.time() - start) / 60 >= config.max_minutes:
            log(f"time budget of {config.max_minutes} min reached at step {step}")
            break
        media, batch_prompts = batch(config.batch_size, prompts, gen)
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout
        batch_prompts = ["" if d else p for d, p in zip(drop.tolist(), batch_prompts)]
        value = loss(denoiser, text_encoder, media * 2 - 1, batch_prompts, gen)
        if not math.isfinite(value.item()):
            raise FloatingPointError(f"pretraining diverged at step {step + 1} (loss {value.item()})")
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        step += 1
        ema_model.update(denoiser, step)
        ema_text.update(text_encoder, step)
        running, seen = running + value.item(), seen + 1
        if step % config.log_every == 0:
            now = time.time()
            rate, last_log = (now - last_log) / seen, now
            log(f"step {step}/{config.steps} loss {running / seen:.4f} lr {lr:.2e} "
                f"{(now - start) / 60:.1f} min ({rate:.2f} s/step recent)")
            running, seen = 0.0, 0
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            checkpoint(final=False)
    checkpoint(final=True)
    return {"step": step, "seconds": round(elapsed_before + time.time() - start, 1), "out": str(out),
            "state": str(state_path), f"{denoiser_key}_parameters": n_params}


def rectified_flow_inputs(x0: torch.Tensor, generator: torch.Generator, logit_mean: float = 0.0,
                          logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_σ, σ, target) of the flow family's path, whatever the layout: x_σ = (1 − σ)x0 + σε, target ε − x0,
    σ ~ logit-normal, as ``FlowGenerator`` trains and samples."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(x0.shape[0], generator=generator))
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, sigma, noise - x0


# --- command line ----------------------------------------------------------------------------------------------
def _arg_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a sequence) of a config field's annotation: int, float | None, tuple[int, ...]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"cannot make a command-line option for the annotation {hint}")
        return _arg_type(inner[0])
    if origin in (tuple, list):
        return typing.get_args(hint)[0], True
    if hint not in (int, float, str, bool):
        raise TypeError(f"cannot make a command-line option for the annotation {hint}")
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--kebab-case`` option per field of ``config_cls``, typed and defaulted from the dataclass."""
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        kind, many = _arg_type(hints[f.name])
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif many:
            parser.add_argument(flag, type=kind, nargs="+", default=list(default), metavar=kind.__name__.upper(),
                                help=f"default: {' '.join(map(str, default))}")
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def config_from_args(config_cls: type, args: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def run_script(config_cls: type, train: Callable[..., dict], doc: str | None,
               argv: list[str] | None = None) -> int:
    """The whole ``scripts/train_toy_*.py`` command line: output folder, state file, --fresh, and the config."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="pipeline folder to write (EMA weights)")
    ap.add_argument("--state", default=None, help="resumable training state file "
                    "(default: <out>.train-state.pt beside the folder)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing state file and start over")
    add_config_arguments(ap, config_cls)
    args = ap.parse_args(argv)
    config = config_from_args(config_cls, args)
    summary = train(config, args.out, args.state, resume=not args.fresh, log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=2))
    return 0
