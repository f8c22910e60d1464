"""A small causal language model on bundled text: the example every config in ``examples/configs`` trains.

- the model is a Llama built from a config (random weights, nothing downloaded); its module names
  (``model.model.layers.0.self_attn.q_proj``, ``...mlp.gate_proj``) are what the seed's ``optim_target_modules``
  regexes ``.*.attn.*`` and ``.*.mlp.*`` select;
- the corpus is ``examples/data/corpus.txt`` (module docstrings of the Python standard library), tokenized by bytes,
  so no tokenizer is downloaded either.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.text import Perplexity
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_optims import OptimizerMixin

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VOCAB_SIZE = 256  # bytes


class ByteTokenizer:
    """UTF-8 bytes as tokens: a vocabulary of 256, nothing to download."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class Blocks(Dataset):
    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        n = (len(ids) - 1) // seq_len
        self.ids = ids[: n * seq_len + 1]
        self.seq_len = seq_len
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": block, "labels": block.clone()}


class TextDataModule(L.LightningDataModule):
    """Non-overlapping blocks of the bundled corpus; the last ``val_fraction`` is held out."""

    def __init__(
        self,
        path: str = str(CORPUS),
        seq_len: int = 64,
        batch_size: int = 4,
        val_fraction: float = 0.1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.tokenizer = ByteTokenizer()

    def setup(self, stage: str) -> None:
        ids = torch.tensor(self.tokenizer.encode(Path(self.path).read_text()), dtype=torch.long)
        split = int(len(ids) * (1 - self.val_fraction))
        self.train_set = Blocks(ids[:split], self.seq_len)
        self.val_set = Blocks(ids[split:], self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CausalLM(OptimizerMixin, L.LightningModule):
    """A Llama-shaped causal LM. Every optimizer setting comes from :class:`OptimizerMixin`'s keyword arguments."""

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        max_position_embeddings: int = 256,
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.val_perplexity = Perplexity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.val_perplexity(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val_loss", out.loss, prog_bar=True)
        self.log("val_perplexity", self.val_perplexity)
