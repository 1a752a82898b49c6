"""White-box knowledge distillation: a student learns from the labels and from a frozen teacher's logits.

MiniMind's recipe (trainer/train_distillation.py): on SFT data, loss = alpha * CE(labels) +
(1 - alpha) * T² * KL(teacher ∥ student) over the answer tokens, alpha 0.5, T 1.5, lr 5e-6 (see
``configs/minimind3/distill.yaml``). The teacher may have any architecture (dense, MoE, larger) as long
as it shares the tokenizer. It is a ``side_models.FrozenModel``: it never enters the optimizer, the state
dict or the checkpoints, stays in eval mode, and follows the student's device and dtype.

Black-box distillation (train on a teacher's generated answers) is ``python main.py generate`` followed
by an ordinary SFT run; see ``minimind_pl/commands/generate.py``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.errors import UserError
from minimind_pl.losses import distillation_loss
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stages.pretrain import SFT
from minimind_pl.stages.side_models import FrozenModel


class Distill(SFT):
    """Supervised fine-tuning of a student towards both the labels and a frozen teacher's distributions."""

    VAL_METRICS = ("loss", "kl")

    def __init__(
        self,
        teacher: Optional[str] = None,
        teacher_preset: Optional[str] = None,
        alpha: float = 0.5,
        temperature: float = 1.5,
        learning_rate: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        """Build the student (``config``, ``init_weights``) and load the frozen teacher.

        Args:
            teacher: The teacher's weights: a Lightning ``.ckpt`` of any stage, a MiniMind ``.pth`` (with
                ``teacher_preset``) or a Hugging Face directory. Its architecture may differ from the
                student's, its vocabulary may not. Required for training.
            teacher_preset: Model preset of a ``.pth`` teacher (a .pth holds no config); without it the
                config is read off the tensor shapes.
            alpha: Weight of the cross entropy on the labels; the KL term gets ``1 - alpha`` (MiniMind: 0.5).
            temperature: Softmax temperature of both distributions in the KL term (MiniMind: 1.5).
            learning_rate: Peak learning rate (MiniMind's distillation: 5e-6).
            kwargs: The arguments of ``SFT`` and ``Stage`` (``config`` of the student, ``init_weights``, ...).
        """
        super().__init__(learning_rate=learning_rate, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self._teacher: FrozenModel | None = None
        if teacher:
            checkpoint = open_checkpoint(teacher)
            self.check_tokenizer(checkpoint.tokenizer_fingerprint, f"the teacher {teacher}")
            self.set_teacher(checkpoint.build_model(teacher_preset, device="cpu"))

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> MiniMindForCausalLM:
        """The frozen teacher (not a submodule, so not in ``state_dict()`` or ``parameters()``)."""
        return self._frozen_teacher().model

    def _frozen_teacher(self) -> FrozenModel:
        """The teacher's holder; a clear error when no teacher was given."""
        if self._teacher is None:
            raise UserError("the Distill stage needs a teacher: pass --model.init_args.teacher PATH")
        return self._teacher

    def set_teacher(self, model: MiniMindForCausalLM) -> None:
        """Freeze ``model`` and hold it as the teacher, after checking that it shares the vocabulary."""
        if model.config.vocab_size != self.config.vocab_size:
            raise UserError(f"teacher and student need the same tokenizer: the teacher's vocab_size is "
                             f"{model.config.vocab_size}, the student's {self.config.vocab_size}")
        self._teacher = FrozenModel(model, "teacher")
        total, _ = model.config.num_parameters()
        rank_zero_info(f"distillation teacher: {total / 1e6:.2f}M parameters, frozen")

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits on the batch, the teacher first moved to the student's device and dtype."""
        return self.forward_batch(batch, self._frozen_teacher().follow(self.model)).logits

    # ------------------------------------------------------------------- losses
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha * (CE + MoE aux) + (1 - alpha) * T² * KL(teacher ∥ student)`` over the answer tokens."""
        out = self.forward_batch(batch)
        labels = batch["labels"]
        ce_loss = self.lm_loss(out.logits, labels)
        kl = self.training_loss(distillation_loss)
        kl_loss = kl(out.logits, self.teacher_logits(batch), labels, self.hparams.temperature)
        alpha = self.hparams.alpha
        loss = alpha * (ce_loss + out.aux_loss) + (1 - alpha) * kl_loss
        logs = {"ce_loss": ce_loss.detach(), "kl_loss": kl_loss.detach()}
        if self.config.use_moe:
            logs["aux_loss"] = out.aux_loss.detach()
        return loss, logs

    def validation_values(self, batch: dict[str, torch.Tensor], loss: torch.Tensor,
                          logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``val/loss`` is the student's plain cross entropy (so ``val/ppl`` compares), ``val/kl`` the KL term."""
        return {"loss": logs["ce_loss"], "kl": logs["kl_loss"]}
