"""From transformers' Trainer to Lightning: an existing ``TrainingArguments`` becomes a Lightning run in three lines.

python examples/migrate.py [--max-steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
from lm import CausalLM, TextDataModule
from transformers import TrainingArguments

from lightning_optims import OptimizerArguments


def main(max_steps: int = 100) -> CausalLM:
    # what a transformers user already has (the APOLLO-Mini example of transformers' optimizer guide)
    training_args = TrainingArguments(
        output_dir="./test-apollo_mini",
        max_steps=max_steps,
        per_device_train_batch_size=2,
        optim="apollo_adamw",
        optim_target_modules=[r".*.attn.*", r".*.mlp.*"],
        optim_args="proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200",
        report_to=[],
    )

    # the three lines: the same optimizer settings on a LightningModule, and a Trainer with the same budget
    model = CausalLM(**OptimizerArguments.from_training_arguments(training_args).as_kwargs())
    trainer = L.Trainer(max_steps=training_args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, TextDataModule(batch_size=training_args.per_device_train_batch_size))
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=100)
    main(parser.parse_args().max_steps)
