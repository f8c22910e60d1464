"""Each module registers its optimizers on import. Adding a family is adding a module here."""

from lightning_optims.families import (  # noqa: F401
    bitsandbytes,
    grokadamw,
    lomo,
    low_rank,
    optimi,
    schedule_free,
    torch_native,
    torchao,
)
