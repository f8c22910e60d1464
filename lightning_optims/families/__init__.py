"""One module per family of optimizers: its specs (``SPECS``), its optimizer (upstream's, or this package's where
upstream is wrong), its step on a sharded parameter, its checks and callbacks. A family module knows nothing of the
registry, which collects the families (:data:`lightning_optims.registry.FAMILIES`); see ``docs/architecture.md``."""
