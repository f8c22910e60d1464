"""LightningCLI entry point: ``python examples/train.py fit --config examples/configs/adamw.yaml``.

Every optimizer setting is a keyword argument of the model (``model.init_args.optim``, ``--model.optim=...``);
``python examples/train.py fit --help`` lists them with their defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_optims.warn import quiet_upstream_noise

quiet_upstream_noise()  # (transformers imports torchao where installed: its CUDA kernels fail to load on the CPU)

from lightning.pytorch.callbacks import TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lm import CausalLM, TextDataModule  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    cli = LightningCLI(
        CausalLM,
        TextDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        # (Rich's bar reads "Epoch 2/-2" when max_steps ends training: max_epochs is -1 then)
        trainer_defaults={"callbacks": [TQDMProgressBar()]},
    )
    if cli.trainer.log_dir is not None and cli.trainer.is_global_zero:
        print(f"logs: {Path(cli.trainer.log_dir).resolve()}")
    return cli


if __name__ == "__main__":
    main()
