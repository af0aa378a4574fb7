"""Run by tests/test_accelerate_configs.py, under torchrun (N processes) or plain python (1): a few DPO steps of a
tiny LoRA that resume from the latest checkpoint in ``out_dir`` whatever process count wrote it; each rank writes
what it resumed and its final trainable weights for the test to compare."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffalign.generators.lora import add_lora  # noqa: E402
from diffalign.generators.registry import load_generator  # noqa: E402
from tiny_models import random_pairs  # noqa: E402
from trainers.config import DPOConfig, TrainConfig  # noqa: E402
from trainers.dpo import DiffusionDPO  # noqa: E402
from trainers.loop import TRAINABLE_FILE, Trainer, latest_checkpoint  # noqa: E402


def main(model_dir: str, out_dir: str, steps: str) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    gen = load_generator(model_dir)
    torch.manual_seed(0)
    add_lora(gen, 4)
    data = random_pairs(16)
    cfg = TrainConfig(max_train_steps=int(steps), train_batch_size=2, learning_rate=1e-2, checkpointing_steps=2,
                      report_to="none", device="cpu", checkpoints_total_limit=None)
    trainer = Trainer(gen, DiffusionDPO(DPOConfig(name="dpo", beta=1000.0)), data, cfg, out_dir)
    ckpt = latest_checkpoint(Path(out_dir))
    loaded_equal = None
    if ckpt is not None:
        trainer.resume(str(ckpt))
        saved = load_file(str(ckpt / TRAINABLE_FILE))
        params = dict(gen.denoiser.named_parameters())
        loaded_equal = all(torch.equal(params[n].detach(), v) for n, v in saved.items())
    resumed_at = trainer.global_step
    trainer.train()
    state = {n: p.detach().clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    acc = trainer.accelerator
    torch.save({"state": state, "resumed_at": resumed_at, "loaded_equal": loaded_equal,
                "num_processes": acc.num_processes, "global_step": trainer.global_step},
               Path(out_dir) / f"result_{acc.num_processes}p_rank{acc.process_index}_{steps}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
