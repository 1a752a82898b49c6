"""The base LightningModule every training stage builds on.

A stage owns one ``MiniMindForCausalLM`` (``self.model``), the optimizer and the schedule. Subclasses
override only what differs: ``compute_loss`` (and, where needed, what they freeze or hold beside the
model: see ``side_models.FrozenModel``) and, for validation, which means they report
(``VAL_METRICS``, ``validation_values``, ``validation_weight``). Lightning owns the loop, precision,
strategy and checkpointing; generated samples are logged by ``callbacks.SampleLogger``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.aggregation import MeanMetric

from minimind_pl.checkpoints import open_checkpoint
from minimind_pl.checkpoints.loading import Checkpoint
from minimind_pl.checkpoints.loading import check_same_tokenizer
from minimind_pl.checkpoints.files import nonfinite_tensors
from minimind_pl.config import ModelConfig, architecture_diff
from minimind_pl.errors import TrainingStopped, UserError
from minimind_pl.lightning_compat import should_accumulate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stages.compiled import CompiledTraining, compile_decision, flex_decision
from minimind_pl.stages.nonfinite import NonFiniteSteps
from minimind_pl.stages.resume import OPTIMIZER_HPARAMS, ResumedRun, collect_rng_states
from minimind_pl.stages.strategies import clips_gradients_itself, decays_weight, gradient_norm_clipped, wrap_for_fsdp
from minimind_pl.throughput import flops_per_token, matmul_peak_tflops
from minimind_pl.tokenizer import TOKENIZER_FILE, Tokenizer


class Stage(L.LightningModule):
    """Shared training logic: model construction, weight import, AdamW, warmup + cosine, logging."""

    #: Validation means logged as ``val/<name>``; ``validation_values`` gives each batch's value and
    #: ``validation_weight`` its weight (here every batch counts the same; LM stages weight by tokens).
    VAL_METRICS: tuple[str, ...] = ("loss",)
    #: Which of them the progress bar shows.
    PROGRESS_METRICS: tuple[str, ...] = ("loss",)
    #: Arguments that define the optimizer's param groups and schedule: a resumed run applies changed ones.
    OPTIMIZER_ARGUMENTS: tuple[str, ...] = OPTIMIZER_HPARAMS
    #: How ``sample_prompts`` are given to the model: ``"text"`` as written, ``"chat"`` as a user turn.
    SAMPLE_STYLE = "text"

    def __init__(
        self,
        config: ModelConfig | None = None,
        init_weights: str | None = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.0,
        min_lr_ratio: float = 0.1,
        tokenizer: str | None = None,
        seq_len: int | None = None,
        sample_prompts: list[str] | None = None,
        sample_max_new_tokens: int = 48,
        peak_tflops: float | None = None,
        compile: bool | None = None,
        flex_attention: bool | None = None,
        nonfinite_step_limit: int = 5,
        allow_tokenizer_mismatch: bool = False,
    ) -> None:
        """Build the transformer for a training stage.

        Args:
            config: The model architecture (MiniMind's field names; unset fields keep the minimind-3
                defaults). Override single fields with ``--model.config.<field>``.
            init_weights: Start from these weights: a Lightning ``.ckpt`` of any stage, a MiniMind ``.pth``
                or a Hugging Face directory. ``None`` starts from random weights.
            learning_rate: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay, applied to weight matrices only (not norms or embeddings'
                biases; the project has no biases).
            betas: AdamW betas.
            warmup_ratio: Fraction of the optimizer steps spent in linear warmup (0 = none, as MiniMind).
            min_lr_ratio: The cosine schedule ends at ``learning_rate * min_lr_ratio`` (MiniMind: 0.1).
            tokenizer: Tokenizer directory, linked from ``--data.tokenizer``: checked against the model's
                vocabulary and used to log generated samples.
            seq_len: Training row length, linked from ``--data.seq_len``: checked against
                ``max_position_embeddings`` and used for the MFU estimate.
            sample_prompts: Prompts completed greedily at each validation and logged to TensorBoard as text
                (by ``callbacks.SampleLogger``, which ``main.py fit`` adds).
            sample_max_new_tokens: Length of those samples in tokens.
            peak_tflops: Peak bf16 matmul TFLOP/s of the accelerator, the denominator of ``train/mfu``.
                ``None`` measures it on CUDA when training starts (a second of bf16 matmuls) and logs no MFU
                on the CPU; 0 turns MFU off.
            compile: Compile the training forward and loss with ``torch.compile`` (validation and samples run
                uncompiled). ``None``: on CUDA yes, on the CPU no (compiling costs more than it saves there).
            flex_attention: Keep packed documents apart with a FlexAttention block mask instead of a dense
                (B, 1, T, T) mask, in compiled training steps. ``None``: on CUDA when ``dropout`` is 0. FlexAttention
                trains only on a GPU (on the CPU it has no backward).
            nonfinite_step_limit: Stop the run (exit code 1, naming the last checkpoint) after this many optimizer
                steps in a row whose loss or gradients were NaN/inf. Each such step is skipped without changing
                the weights or the optimizer's moments and counted in ``train/skipped_steps``.
            allow_tokenizer_mismatch: Only warn when ``init_weights`` (or the checkpoint to resume) was trained with
                another tokenizer than ``--data.tokenizer`` (checkpoints record its vocabulary fingerprint).
        """
        super().__init__()
        if nonfinite_step_limit < 1:
            raise UserError(f"nonfinite_step_limit must be at least 1, got {nonfinite_step_limit}")
        if config is None:
            config = ModelConfig()
        elif isinstance(config, dict):  # checkpoints store the config as a plain dict
            config = ModelConfig.from_dict(config)
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = config.to_dict()
        self.config = config
        self._tokenizer = read_run_tokenizer(tokenizer)  # the one copy of this run (see the ``tokenizer`` property)
        check_fits(config, self._tokenizer, tokenizer, seq_len)
        #: ``Tokenizer.vocabulary_fingerprint`` of ``--data.tokenizer``, recorded in every checkpoint.
        self.tokenizer_fingerprint = self._tokenizer.vocabulary_fingerprint if self._tokenizer else None
        self.model = self.build_model(config)
        if init_weights:
            self.load_initial_weights(init_weights)
        #: The training fast path (compiled forward and losses), set up when training starts on its device.
        self.compiled: CompiledTraining | None = None
        #: The measured or given peak TFLOP/s behind ``train/mfu`` (None: no MFU).
        self.peak_tflops = peak_tflops or None
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in self.VAL_METRICS})
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        self._last_log_interval = 0  # the logging interval (global_step // log_every_n_steps) last logged
        self.nonfinite = NonFiniteSteps()
        self._resumed: ResumedRun | None = None  # the checkpoint's arguments and RNG states, until training resumes

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (``--data.tokenizer``), read once per run: in ``__init__`` when its folder exists, else
        here on first use (a missing folder then fails with ``Tokenizer.from_file``'s error). What the stage
        and its callbacks encode or decode (sample prompts, tag ids, sampled answers) goes through it."""
        if self._tokenizer is None:
            if not self.hparams.tokenizer:
                raise UserError(f"{type(self).__name__} needs the tokenizer: pass --data.tokenizer <folder> "
                                f"(or tokenizer=<folder> when building the stage in Python)")
            self._tokenizer = Tokenizer.from_file(self.hparams.tokenizer)
        return self._tokenizer

    # ----------------------------------------------------------------- weights
    def build_model(self, config: ModelConfig) -> MiniMindForCausalLM:
        """The trained model, random (a stage with more than the transformer, e.g. a VLM, builds its own)."""
        return MiniMindForCausalLM(config)

    def load_initial_weights(self, path: str) -> None:
        """Load ``path`` (.ckpt / .pth / HF dir / LoRA checkpoint, merged) into the transformer.

        Names must match exactly, and the architecture must be the one this stage was configured with.
        """
        checkpoint = open_checkpoint(path)
        self.check_tokenizer(checkpoint.tokenizer_fingerprint, f"--model.init_weights {path}")
        if checkpoint.model_config is not None:
            diff = architecture_diff(checkpoint.model_config, self.config)
            if diff:
                raise UserError(f"--model.init_weights {path} was trained with another architecture ({diff}, "
                                f"checkpoint != this run); pass the checkpoint's values as --model.config.<field>")
        self.model.load_weights(self.initial_weights(checkpoint, f"--model.init_weights {path}"), strict=True)

    def initial_weights(self, checkpoint: Checkpoint, where: str) -> dict[str, torch.Tensor]:
        """The state dict ``self.model`` starts from, out of ``checkpoint`` (named ``where`` in errors)."""
        if checkpoint.adapter is None:
            return checkpoint.weights
        return checkpoint.build_model(merge=True).state_dict()  # a LoRA checkpoint: its adapters folded into its base

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model config as a plain dict so every tool can rebuild the model from the ckpt, and the RNG
        states so a resumed run draws the same dropout masks. Refuse to write non-finite weights: the run stops
        and the checkpoints already written stay as they are."""
        bad = nonfinite_tensors(checkpoint["state_dict"].items())
        if bad:
            raise TrainingStopped(
                f"the weights became NaN/inf by step {self.global_step} ({bad[0]}"
                f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}): no checkpoint was written. "
                f"{last_checkpoint_advice(self.trainer)}")
        checkpoint["model_config"] = self.config.to_dict()
        checkpoint["stage"] = type(self).__name__
        checkpoint["rng_states"] = collect_rng_states()
        if self.tokenizer_fingerprint is not None:
            checkpoint["tokenizer_fingerprint"] = self.tokenizer_fingerprint

    def check_tokenizer(self, recorded: str | None, model: str) -> None:
        """``model`` (weights this run starts from) must come from the tokenizer of ``--data.tokenizer``."""
        check_same_tokenizer(recorded, self.tokenizer_fingerprint, model, self.hparams.tokenizer,
                             self.hparams.allow_tokenizer_mismatch, "--model.allow_tokenizer_mismatch true")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what resuming needs once training starts again: the RNG states and the saved arguments."""
        self.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), "the checkpoint to resume (--ckpt_path)")
        self._resumed = ResumedRun.from_checkpoint(checkpoint)

    def configure_model(self) -> None:
        """Under FSDP: one unit per transformer block (``strategies.wrap_for_fsdp``); nothing otherwise."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            wrap_for_fsdp(self)

    def on_fit_start(self) -> None:
        """On the training device: set up the compiled fast path and measure the matmul peak for MFU."""
        device = self.device
        if compile_decision(self.hparams.compile, device):
            flex = flex_decision(self.hparams.flex_attention, device, self.config.dropout)
            self.compiled = CompiledTraining(self.model, flex_attention=flex)
        if self.hparams.peak_tflops is None and device.type == "cuda":
            self.peak_tflops = matmul_peak_tflops(device)
            rank_zero_info(f"measured bf16 matmul peak: {self.peak_tflops:.0f} TFLOP/s (the denominator of train/mfu)")

    def on_fit_end(self) -> None:
        """Drop the compiled forward (a later ``fit`` or tool sees the plain model)."""
        self.compiled = None

    def on_train_start(self) -> None:
        """After a resume: apply this run's optimizer settings where they differ from the checkpoint's."""
        self._last_log_interval = self.global_step // self.trainer.log_every_n_steps
        if self._resumed is not None and self._resumed.optimizer_settings_changed(dict(self.hparams),
                                                                                  self.OPTIMIZER_ARGUMENTS):
            self.apply_optimizer_settings(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """After a resume, restore the RNG states right before the first step, where the straight run had them."""
        if self._resumed is not None:
            self._resumed.restore_rng_states()
            self._resumed = None

    # -------------------------------------------------------------------- steps
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss to minimise and extra tensors to log. Each stage overrides this."""
        raise NotImplementedError

    def forward_batch(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None):
        """Run the transformer (or another ``model``, e.g. a teacher) on a batch of packed or padded rows.

        Training steps of the trained model go through the compiled fast path when there is one.
        """
        if model is None or model is self.model:
            inputs_embeds = self.input_embeddings(batch)
            if self.compiled is not None and self.training:
                return self.compiled.forward(batch, inputs_embeds)
            return self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                              doc_ids=batch.get("doc_ids"), inputs_embeds=inputs_embeds)
        return model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))

    def input_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """What the trained transformer reads instead of its token embeddings (B, T, C), computed outside the
        compiled graph; None (here): the token embeddings. A vision-language stage merges the images in."""
        return None

    def training_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` compiled for training steps on the fast path, else as it is."""
        if self.compiled is not None and self.training:
            return self.compiled.loss(loss_fn)
        return loss_fn

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch: compute the stage's loss and log it (no GPU->CPU sync here)."""
        loss, logs = self.compute_loss(batch)
        self.nonfinite.note_loss(loss)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        for name, value in logs.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        self._tokens_since_log += int(batch["real_tokens"]) if "real_tokens" in batch else 0
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Add this batch's values (``validation_values``) to the validation means."""
        loss, logs = self.compute_loss(batch)
        values, weight = self.validation_values(batch, loss, logs), self.validation_weight(batch)
        for name, metric in self.val_metrics.items():
            metric.update(values[name], weight)

    def validation_values(self, batch: dict[str, torch.Tensor], loss: torch.Tensor,
                          logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each ``VAL_METRICS`` value of one batch: by default the loss and what ``compute_loss`` logs."""
        return {"loss": loss.detach(), **logs}

    def validation_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """How much a batch counts in the validation means (default: every batch the same)."""
        return 1.0

    def on_validation_epoch_end(self) -> None:
        """Log each validation mean as ``val/<name>`` (plus what ``validation_logs`` derives)."""
        means = {name: metric.compute() for name, metric in self.val_metrics.items()}
        for metric in self.val_metrics.values():
            metric.reset()
        for name, value in self.validation_logs(means).items():
            # already the mean over all ranks (torchmetrics syncs on compute); sync_dist only says so to Lightning
            self.log(f"val/{name}", value, prog_bar=name in self.PROGRESS_METRICS, sync_dist=True)

    def validation_logs(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What is logged from the validation means (a stage may add derived values)."""
        return means

    # --------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """Fused AdamW (decay on all weights but the norms') with linear warmup and cosine to ``min_lr_ratio``.

        Fused, on CPU too, because only the fused kernel takes ``found_inf``: the flag that skips a step whose
        gradients are not finite without a GPU->CPU sync (see ``configure_gradient_clipping``).
        """
        groups = [{"params": params, **settings}
                  for params, settings in zip(self.parameter_groups(), self.optimizer_group_settings())]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=self.hparams.betas,
                                      fused=self.device.type in FUSED_ADAMW_DEVICES)
        total = max(self.total_optimizer_steps(), 1)
        self.schedule_steps = (total, int(total * self.hparams.warmup_ratio))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.learning_rate_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """The trained parameters in optimizer groups: weight matrices (decayed), then the rest (norm weights)."""
        return split_by_decay(self.named_parameters())

    def optimizer_group_settings(self) -> list[dict[str, Any]]:
        """Learning rate and weight decay of each of ``parameter_groups``."""
        lr = self.hparams.learning_rate
        return [{"lr": lr, "weight_decay": self.hparams.weight_decay}, {"lr": lr, "weight_decay": 0.0}]

    def learning_rate_factor(self, step: int) -> float:
        """The schedule's factor at optimizer step ``step`` (``schedule_steps`` is set by configure_optimizers)."""
        total, warmup = self.schedule_steps
        return lr_multiplier(step, total, warmup, self.hparams.min_lr_ratio)

    def apply_optimizer_settings(self, optimizer: torch.optim.Optimizer, schedule: Any) -> None:
        """Put this run's learning rate, betas, weight decay and schedule into a restored optimizer, at the
        schedule's current step (a resume with a changed learning rate continues from there)."""
        settings = self.optimizer_group_settings()
        for group, group_settings in zip(optimizer.param_groups, settings):
            group.update(group_settings, initial_lr=group_settings["lr"], betas=tuple(self.hparams.betas))
        schedule.base_lrs = [group_settings["lr"] for group_settings in settings]
        for group, base_lr in zip(optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base_lr * self.learning_rate_factor(schedule.last_epoch)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule.

        Counted from a fresh train loader of the DataModule rather than ``trainer.estimated_stepping_batches``:
        that property sets up the fit loop's loader before a resumed checkpoint is restored, and Lightning
        then never hands the saved loader position back (Lightning issue #20550), so a resumed run would
        restart its epoch from the first batch.
        """
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is None:  # dataloaders passed to fit() directly: the loop position is not ours
            return int(trainer.estimated_stepping_batches)
        batches = len(datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) * self.optimizer_steps_per_batch()
        by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        by_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        candidates = [n for n in (by_epochs, by_steps) if n is not None]
        return min(candidates) if candidates else int(trainer.estimated_stepping_batches)

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps a training batch makes (1; an RL stage's rollout batch may make several)."""
        return 1

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip through the Trainer's setting and log the global grad norm it measured (one fused norm; under FSDP
        over all ranks' shards). DeepSpeed's engine clips by itself."""
        strategy = self.trainer.strategy
        if clips_gradients_itself(strategy) or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        norms = {}
        for name, group_indices in self.clip_sets().items():  # each set clipped to max_norm on its own
            params = [p for i in group_indices for p in optimizer.param_groups[i]["params"] if p.grad is not None]
            norms[name] = gradient_norm_clipped(self.trainer, params, max_norm)  # NaN/inf when any gradient is
        total = torch.stack(list(norms.values())).sum()  # non-finite when any set's norm is
        found_inf = self.nonfinite.verdict(total, self.global_step + 1)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = found_inf  # the fused kernel skips this step when it is 1, on the device
        for name, norm in norms.items():
            self.log(f"train/grad_norm{'_' + name if name else ''}", norm, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.nonfinite.skipped.float(), on_step=True, on_epoch=False)

    def clip_sets(self) -> dict[str, list[int]]:
        """Which optimizer param groups are clipped together, by a name for the logged norm (``""``:
        ``train/grad_norm``). One set of all groups; PPO clips its policy and its critic apart, as MiniMind does."""
        return {"": list(range(len(self.optimizer_group_settings())))}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimizer step: stop a diverged run; once per logging interval, log the learning rate and
        real (non-padding) tokens per second."""
        if should_accumulate(self.trainer):
            return
        self.stop_if_diverged()
        interval = self.global_step // self.trainer.log_every_n_steps  # a batch may make several steps (RL)
        if interval == self._last_log_interval:
            return
        self._last_log_interval = interval
        now = time.perf_counter()
        if self._last_log_time is not None:
            tokens_per_sec = self._tokens_since_log * self.trainer.world_size / max(now - self._last_log_time, 1e-9)
            self.log("train/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False)
            if self.peak_tflops:
                mfu = tokens_per_sec * self.flops_per_token() / (self.peak_tflops * 1e12 * self.trainer.world_size)
                self.log("train/mfu", mfu, on_step=True, on_epoch=False)
        self._last_log_time, self._tokens_since_log = now, 0
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def stop_if_diverged(self) -> None:
        """Stop after ``nonfinite_step_limit`` skipped steps in a row, as the host last saw them (no sync)."""
        in_a_row, skipped, step = self.nonfinite.host_counts()
        if in_a_row < self.hparams.nonfinite_step_limit:
            return
        raise TrainingStopped(
            f"training diverged: the loss or gradients were NaN/inf at optimizer steps {step - in_a_row + 1}-{step} "
            f"({in_a_row} in a row, {skipped} in all); each was skipped, so the weights are those of step "
            f"{step - in_a_row}. {last_checkpoint_advice(self.trainer)}")

    def flops_per_token(self) -> float:
        """Training FLOPs per token of this model at ``seq_len`` (``throughput.flops_per_token``)."""
        return flops_per_token(self.config, self.hparams.seq_len or 0)

    # -------------------------------------------------------------- samples
    def sample_prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """Token ids of ``sample_prompts``: as text after bos, or rendered as chats (``SAMPLE_STYLE``)."""
        prompts = self.hparams.sample_prompts or []
        if self.SAMPLE_STYLE == "chat":
            return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        return [tokenizer.encode_text(p) for p in prompts]


def split_by_decay(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Trainable parameters as ``[decayed, not decayed]`` (``strategies.decays_weight``: by name)."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    return [[p for n, p in named if decays_weight(n)], [p for n, p in named if not decays_weight(n)]]


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps", "xpu")


def last_checkpoint_advice(trainer: "L.Trainer") -> str:
    """Where the newest checkpoint of this run is, and how to go on from it with a lower learning rate."""
    paths = [path for callback in trainer.checkpoint_callbacks
             for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")) if path]
    if not paths:
        return "No checkpoint was written before; lower --model.learning_rate and start again."
    return (f"Last good checkpoint: {paths[0]}. Go on from it with a lower learning rate: add "
            f"--ckpt_path {paths[0]} --model.learning_rate <lower> to the same command.")


def read_run_tokenizer(tokenizer: str | None) -> Tokenizer | None:
    """The run's tokenizer (``--data.tokenizer``) if its folder exists (the DataModule reports a missing one)."""
    if tokenizer and (Path(tokenizer) / TOKENIZER_FILE).exists():
        return Tokenizer.from_file(tokenizer)
    return None


def check_fits(config: ModelConfig, tokenizer: Tokenizer | None, tokenizer_dir: str | None, seq_len: int | None) -> None:
    """Fail early, with both numbers, when the tokenizer (read from ``tokenizer_dir``) or the rows do not fit."""
    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        if vocab > config.vocab_size:
            raise UserError(f"tokenizer {tokenizer_dir} has {vocab} tokens but the model's vocab_size is "
                            f"{config.vocab_size}; set --model.config.vocab_size {vocab}")
    if seq_len and seq_len > config.max_position_embeddings:
        raise UserError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                        f"{config.max_position_embeddings}; lower --data.seq_len or raise "
                        f"--model.config.max_position_embeddings")
