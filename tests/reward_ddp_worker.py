"""Run by tests/test_reward_training_accelerate.py under a 2-process launch (torchrun, gloo on the CPU): trains
the recipe given as a YAML file and dumps what this rank ended with — its weights, whether it wrote the model,
its metrics — to ``<dump>/rank<R>.pt``."""

import sys
from pathlib import Path

import torch

import rewards.train as train


def main(recipe: str, dump: str) -> None:
    from accelerate import PartialState

    writes = []
    write_model = train._write_model

    def counted(adapter, folder):
        writes.append(str(folder))
        return write_model(adapter, folder)

    train._write_model = counted
    res = train.run_reward_recipe(recipe)
    state = PartialState()
    assert state.num_processes == 2, state.distributed_type
    torch.save({"state": {k: v.detach().cpu() for k, v in res["model"].state_dict().items()},
                "writes": writes, "metrics": res["metrics"], "checkpoint": res["checkpoint"]},
               Path(dump) / f"rank{state.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
