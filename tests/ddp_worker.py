"""Run by tests/test_multiprocess.py under ``torchrun --nproc_per_node 2``: two CPU ranks (gloo) train a few
DPO steps on different rows; each writes its final trainable weights for the test to compare."""

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
from trainers.loop import Trainer  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    gen = load_generator(model_dir)
    torch.manual_seed(0)
    add_lora(gen, 4)
    data = random_pairs(16)
    cfg = TrainConfig(max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                      checkpointing_steps=2, report_to="none", device="cpu")
    trainer = Trainer(gen, DiffusionDPO(DPOConfig(name="dpo", beta=1000.0)), data, cfg, out_dir)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.distributed_type
    first_rows = trainer._micro_batch(0, 0)["chosen"]
    trainer.train()
    state = {n: p.detach().clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    torch.save({"state": state, "rows": first_rows}, Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
