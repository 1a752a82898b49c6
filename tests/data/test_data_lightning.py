"""The data modules inside a real Lightning Trainer: --ckpt_path resumes with the next batch."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from minimind_pl.data import PretrainDataModule, SFTDataModule


class Recorder(L.LightningModule):
    """Tiny LM that records the batches it trains on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list = []
        self.val_batches = 0

    def _loss(self, batch):
        logits = self.head(self.emb(batch["input_ids"]))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def training_step(self, batch, batch_idx):
        assert batch["real_tokens"].device.type == "cpu" and batch["real_tokens"].dim() == 0
        self.seen.append((self.current_epoch, batch["input_ids"].clone()))
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        return self._loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, callbacks=(), **kw):
    return L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=list(callbacks), **kw)


def test_ckpt_path_resumes_with_the_next_batch(corpus, tok_dir, tmp_path):
    def dm():
        return PretrainDataModule(str(corpus / "pretrain_real_val.jsonl"), seq_len=512, batch_size=8,
                                  tokenizer=tok_dir, cache_dir=str(tmp_path / "cache"), num_workers=1,
                                  val_fraction=0.1)

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1,
                           filename="{step}")
    epoch_ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1,
                                 filename="end-{epoch}-{step}", save_on_train_epoch_end=True)
    full = Recorder(6400)
    _trainer(tmp_path, [ckpt, epoch_ckpt], max_epochs=2, val_check_interval=3).fit(full, datamodule=dm())
    steps_per_epoch = sum(1 for e, _ in full.seen if e == 0)
    assert len(full.seen) == 2 * steps_per_epoch and full.val_batches > 0
    first, second = [b for e, b in full.seen if e == 0], [b for e, b in full.seen if e == 1]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # reshuffled each epoch

    assert steps_per_epoch == 7  # 51 rows of 512 tokens, 8 per batch
    resume_points = [(3, "step=3.ckpt"), (9, "step=9.ckpt"),
                     (steps_per_epoch, f"end-epoch=0-step={steps_per_epoch}.ckpt")]  # mid-epoch 0 / 1, epoch end
    for step, name in resume_points:
        resumed = Recorder(6400)
        _trainer(tmp_path / f"r{step}", max_epochs=2, val_check_interval=3).fit(
            resumed, datamodule=dm(), ckpt_path=str(tmp_path / "ckpt" / name))
        assert len(resumed.seen) == len(full.seen) - step
        for (e1, b1), (e2, b2) in zip(resumed.seen, full.seen[step:]):
            assert e1 == e2 and torch.equal(b1, b2)


def test_fit_without_validation_data(corpus, tok_dir, tmp_path):
    dm = SFTDataModule(str(corpus / "sft_real.jsonl"), seq_len=512, batch_size=8, tokenizer=tok_dir,
                       cache_dir=str(tmp_path), num_workers=0)
    model = Recorder(dm.vocab_size)
    _trainer(tmp_path, max_steps=3).fit(model, datamodule=dm)
    assert len(model.seen) == 3 and model.val_batches == 0
