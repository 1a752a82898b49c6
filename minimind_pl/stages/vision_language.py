"""MiniMind-V's two training stages: VLM pretraining and VLM SFT, on image conversations.

Both train a ``MiniMindVLM`` (the shared transformer + ``vision_proj``) whose vision tower (``--model.vision_encoder``,
a Hugging Face SigLIP / SigLIP2 / CLIP folder) stays frozen and outside the module tree: it is never in the state dict,
the optimizer or DDP's gradient sync. The loss is SFT's (the data labels the assistant answers only; image tokens
never carry a loss). They differ in MiniMind-V's recipe (jingyaogong/minimind-v trainer/train_pretrain_vlm.py and
train_sft_vlm.py): what trains (``trainable``, its ``freeze_llm``) and the learning rate.

``trainable`` (MiniMind-V's ``freeze_llm`` 2 / 1 / 0):

- ``projector``: only ``vision_proj`` (VLM pretraining);
- ``first_last``: the projector plus the language model's first and last blocks (VLM SFT);
- ``all``: the projector and the whole language model (embeddings, every block, the final norm).

Frozen parameters have ``requires_grad`` off, so they are in no optimizer group (never decayed) and DDP leaves them
out of its gradient sync. The starting weights (``--model.init_weights``) may be a text checkpoint (the projector
starts fresh) or a vision-language one (``.ckpt`` of these stages, MiniMind-V ``.pth``), whose recorded tower must be
this run's (``vision.tower.check_same_tower``, like the tokenizer check). Checkpoints hold ``model.*`` = MiniMind-V's
``.pth`` (the language model and ``vision_proj``, no tower) plus the usual metadata, ``vision_config`` and the tower's
folder and fingerprint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from minimind_pl.checkpoints.loading import Checkpoint
from minimind_pl.checkpoints.minimind import infer_vision_config
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.losses import IGNORE_INDEX
from minimind_pl.lora import count_parameters
from minimind_pl.stages.pretrain import SFT
from minimind_pl.vision.config import VisionConfig
from minimind_pl.vision.tower import VisionTower, check_same_tower, load_vision_tower, tower_record
from minimind_pl.vision.vlm import MiniMindVLM, image_slots

Trainable = Literal["projector", "first_last", "all"]
TRAINABLE: tuple[str, ...] = ("projector", "first_last", "all")
PIXEL_VALUES = "pixel_values"
MISMATCH_FLAG = "--model.allow_vision_encoder_mismatch true"
IMAGE_TAG = "<image>"


@dataclass
class ImageSample:
    """One image of a batch as TensorBoard shows it, and its conversation: ``image`` (3, H, W) in [0, 1] on the CPU,
    ``prompt`` (the text up to the answer, each image's placeholder run written ``<image>``), ``reference`` (the
    labelled answer); what the model needs to answer it itself: ``prompt_ids`` (the prompt's tokens, placeholders
    included) and ``pixels`` (N, 3, H, W), the preprocessed images of the prompt's runs, on the batch's device
    (None: the prompt has none)."""

    image: torch.Tensor
    prompt: str
    reference: str
    prompt_ids: list[int]
    pixels: Optional[torch.Tensor]


class VisionLanguage(SFT):
    """A MiniMind-V stage: SFT's loss on rows with images (``pixel_values``), the tower frozen, ``trainable`` chosen.

    Use :class:`VLMPretrain` or :class:`VLMSFT` (MiniMind-V's recipes as their defaults)."""

    def __init__(self, vision_encoder: str, trainable: Trainable = "first_last", vision_preset: str = "minimind-3v",
                 allow_vision_encoder_mismatch: bool = False, **kwargs: Any) -> None:
        """Build the vision-language model, load ``init_weights`` into it and freeze what does not train.

        Args:
            vision_encoder: The frozen vision tower: a Hugging Face SigLIP / SigLIP2 / CLIP folder (config.json,
                weights, preprocessor_config.json), e.g. MiniMind-V's ``siglip2-base-p32-256-ve``. Never trained or
                saved; checkpoints record its folder and a fingerprint of its weights. The DataModule's
                ``vision_encoder`` must be the same folder.
            trainable: What trains besides nothing else: ``projector`` (``vision_proj`` only), ``first_last``
                (the projector and the language model's first and last blocks) or ``all`` (the projector and the
                whole language model). MiniMind-V's ``--freeze_llm`` 2 / 1 / 0.
            vision_preset: The MiniMind-V generation (``vision.config.VISION_PRESETS``): ``minimind-3v`` (MLP
                projector, ``<|image_pad|>``) or ``minimind2-v`` (linear projector, ``@``). Features per image and
                their width come from the tower, the placeholder's id from the tokenizer.
            allow_vision_encoder_mismatch: Only warn when ``init_weights`` (or the checkpoint to resume) was trained
                with a tower whose weights differ from ``vision_encoder``'s.
            kwargs: The arguments of ``SFT`` / ``Stage`` (``config``, ``init_weights``, ``learning_rate``, ...).
        """
        if trainable not in TRAINABLE:
            raise UserError(f"trainable must be one of {TRAINABLE}, not {trainable!r}")
        super().__init__(**kwargs)
        freeze_except(self.model, trainable)

    # ----------------------------------------------------------------- model
    @property
    def tower(self) -> VisionTower:
        """The frozen vision tower (held by the model, outside its module tree)."""
        return self.model.tower

    def build_model(self, config: ModelConfig) -> MiniMindVLM:
        """The language model plus a fresh projector, reading images through the tower of ``vision_encoder``."""
        tower = load_vision_tower(self.hparams.vision_encoder)
        return MiniMindVLM(config, self.vision_config_for(tower), tower)

    def vision_config_for(self, tower: VisionTower) -> VisionConfig:
        """``vision_preset`` with the tower's features per image and width, and the placeholder's id in the run's
        tokenizer (the preset's when the tokenizer is not known yet)."""
        preset = VisionConfig.from_preset(self.hparams.vision_preset)
        token_id = preset.image_token_id
        if self._tokenizer is not None:
            token_id = self._tokenizer.token_to_id(preset.image_token)
            if token_id is None:
                raise UserError(f"the image placeholder {preset.image_token!r} of {self.hparams.vision_preset} is not "
                                f"one token of the tokenizer {self.hparams.tokenizer}")
        return VisionConfig(image_token=preset.image_token, image_token_id=token_id,
                            image_token_len=tower.config.num_patches, image_hidden_size=tower.config.hidden_size,
                            projector=preset.projector)

    def initial_weights(self, checkpoint: Checkpoint, where: str) -> dict[str, torch.Tensor]:
        """A vision-language checkpoint's weights (its tower and vision config must be this run's), or a text
        model's plus this model's fresh projector."""
        weights = super().initial_weights(checkpoint, where)
        if not checkpoint.is_vision_language:
            return {**weights, **{f"vision_proj.{k}": v for k, v in self.model.vision_proj.state_dict().items()}}
        self.check_tower(checkpoint.vision_encoder_fingerprint, where)
        recorded = checkpoint.vision_config or infer_vision_config(weights, self.tower.config.num_patches)
        check_same_vision(VisionConfig.from_dict(recorded), self.model.vision_config, where)
        return weights

    def check_tower(self, recorded: Optional[str], where: str) -> None:
        """``where`` (weights this run starts from) must have been trained with this run's tower."""
        check_same_tower(recorded, self.tower, where, self.hparams.allow_vision_encoder_mismatch, MISMATCH_FLAG)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base's metadata plus the vision config and the tower's folder and fingerprint (never its weights)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["vision_config"] = self.model.vision_config.to_dict()
        checkpoint.update(tower_record(self.tower))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run to resume must have the same tower and train the same parameters (the optimizer's groups)."""
        super().on_load_checkpoint(checkpoint)
        self.check_tower(checkpoint.get("vision_encoder_fingerprint"), "the checkpoint to resume (--ckpt_path)")
        saved = (checkpoint.get("hyper_parameters") or {}).get("trainable")
        if saved is not None and saved != self.hparams.trainable:
            raise UserError(f"the checkpoint to resume (--ckpt_path) trained {saved!r}, this run "
                            f"--model.trainable {self.hparams.trainable!r}: the optimizer's state belongs to the "
                            f"parameters it trained. Start a new run from its weights with --model.init_weights.")

    def setup(self, stage: str) -> None:
        """The DataModule must write this model's placeholder, as many per image as the tower gives features, and
        preprocess images for this tower."""
        check_data_agrees(getattr(self.trainer, "datamodule", None), self.model.vision_config,
                          self.hparams.vision_encoder)

    def on_fit_start(self) -> None:
        """The base's set-up, and how many parameters train."""
        super().on_fit_start()
        trained, total = count_parameters(self.model)
        rank_zero_info(f"{type(self).__name__} ({self.hparams.trainable}): {trained:,} trainable parameters "
                       f"({100.0 * trained / max(total, 1):.2f}% of {total:,}; the vision tower's "
                       f"{sum(p.numel() for p in self.tower.parameters()):,} are frozen)")

    # ------------------------------------------------------------------ steps
    def input_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows' token embeddings with the images' projected features merged in.

        A batch without images still runs the projector, on no features: its parameters then take part in every
        step's graph (with zero gradients), which DDP without ``find_unused_parameters`` requires, and a
        projector-only run still has a loss to call backward on.
        """
        input_ids, pixel_values = batch["input_ids"], batch.get(PIXEL_VALUES)
        if pixel_values is not None:
            return self.model.embed_inputs(input_ids, pixel_values)
        embeds = self.model.model.embed_tokens(input_ids)
        no_features = embeds.new_zeros(0, self.model.vision_config.image_hidden_size)
        return embeds + self.model.vision_proj(no_features).sum().to(embeds.dtype)  # + 0: the sum of nothing


    # ---------------------------------------------------------------- samples
    @torch.no_grad()
    def image_sample(self, batch: dict[str, torch.Tensor]) -> Optional[ImageSample]:
        """The first image of ``batch`` with its document's prompt and reference answer (None: no image). For
        ``callbacks.SampleLogger``; one host sync, at the end of a validation."""
        pixel_values, ids = batch.get(PIXEL_VALUES), batch["input_ids"]
        is_image = ids == self.model.vision_config.image_token_id
        rows = is_image.any(dim=1).nonzero().flatten().tolist()
        if pixel_values is None or not rows:
            return None
        row = rows[0]
        document = torch.ones_like(ids[row], dtype=torch.bool)
        if "doc_ids" in batch:  # a packed row: the document of the row's first placeholder
            document = batch["doc_ids"][row] == batch["doc_ids"][row, int(is_image[row].nonzero()[0])]
        tokens, labels = ids[row][document], batch["labels"][row][document]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        prompt_end = labelled[0] + 1 if labelled else len(tokens)  # labels[t] is the token at t + 1
        vision = self.model.vision_config
        _, image, _ = image_slots(ids[row:row + 1], vision.image_token_id, vision.image_token_len)
        in_prompt = is_image[row] & document & (torch.cumsum(document, 0) <= prompt_end)
        first = int(image[0][is_image[row] & document].min())  # the document's first image
        prompt_images = image[0][in_prompt]  # none when the document's images are in its answers only
        placeholder = re.escape(vision.image_token)
        prompt_ids = tokens[:prompt_end].tolist()
        prompt = re.sub(f"(?:{placeholder})+", IMAGE_TAG, self.tokenizer.decode(prompt_ids))
        return ImageSample(viewable(pixel_values[row, first], self.tower.image_spec), prompt,
                           self.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()), prompt_ids,
                           pixel_values[row, first:int(prompt_images.max()) + 1] if len(prompt_images) else None)


class VLMPretrain(VisionLanguage):
    """MiniMind-V's VLM pretraining: image captions, the projector alone trains (trainer/train_pretrain_vlm.py)."""

    def __init__(self, trainable: Trainable = "projector", learning_rate: float = 4e-4, **kwargs: Any) -> None:
        """Build the stage.

        Args:
            trainable: What trains (see ``VisionLanguage``); MiniMind-V's pretraining: ``projector``
                (``--freeze_llm 2``).
            learning_rate: Peak learning rate (MiniMind-V's pretraining: 4e-4).
            kwargs: The arguments of ``VisionLanguage`` / ``SFT`` / ``Stage`` (``vision_encoder``, ...).
        """
        super().__init__(trainable=trainable, learning_rate=learning_rate, **kwargs)


class VLMSFT(VisionLanguage):
    """MiniMind-V's VLM SFT: image conversations, the projector and the language model's first and last blocks
    train (trainer/train_sft_vlm.py)."""

    def __init__(self, trainable: Trainable = "first_last", learning_rate: float = 5e-6, **kwargs: Any) -> None:
        """Build the stage.

        Args:
            trainable: What trains (see ``VisionLanguage``); MiniMind-V's SFT: ``first_last``
                (``--freeze_llm 1``).
            learning_rate: Peak learning rate (MiniMind-V's SFT: 5e-6).
            kwargs: The arguments of ``VisionLanguage`` / ``SFT`` / ``Stage`` (``vision_encoder``, ...).
        """
        super().__init__(trainable=trainable, learning_rate=learning_rate, **kwargs)


def viewable(pixels: torch.Tensor, spec: Any) -> torch.Tensor:
    """A preprocessed image (3, H, W) back in [0, 1] (undoing ``ImageSpec``'s normalisation), float32 on the CPU."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (spec.mean, spec.std))
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1)


def freeze_except(model: MiniMindVLM, trainable: str) -> None:
    """Turn ``requires_grad`` off for everything that does not train under ``trainable`` (see the module doc)."""
    model.requires_grad_(trainable == "all")
    model.vision_proj.requires_grad_(True)
    if trainable == "first_last":
        layers = model.model.layers
        for block in {0: layers[0], len(layers) - 1: layers[-1]}.values():
            block.requires_grad_(True)


def check_same_vision(recorded: VisionConfig, current: VisionConfig, where: str) -> None:
    """Weights trained with another placeholder, projector or feature shape do not fit this run's model."""
    differ = [f"{k}: {v!r} != {current.to_dict()[k]!r}" for k, v in recorded.to_dict().items() if current.to_dict()[k] != v]
    if differ:
        raise UserError(f"{where} was trained with another vision config ({', '.join(differ)}; checkpoint != this "
                        f"run): choose the matching --model.vision_preset and --model.vision_encoder")


def check_data_agrees(datamodule: Any, vision: VisionConfig, vision_encoder: str) -> None:
    """Refuse a DataModule whose placeholder, its id, its count per image or tower folder differ from the model's (a
    DataModule without images, or without these attributes, is not checked)."""
    problems = []
    if getattr(datamodule, "image_token", vision.image_token) != vision.image_token:
        problems.append(f"--data.image_token {datamodule.image_token!r} but the model's placeholder is "
                        f"{vision.image_token!r} (--model.vision_preset)")
    if getattr(datamodule, "image_token_id", vision.image_token_id) != vision.image_token_id:
        problems.append(f"the data's tokenizer writes {vision.image_token!r} as id {datamodule.image_token_id} but the "
                        f"model reads id {vision.image_token_id} (--data.tokenizer and --model.tokenizer differ?)")
    if getattr(datamodule, "image_token_len", vision.image_token_len) != vision.image_token_len:
        problems.append(f"--data.image_token_len {datamodule.image_token_len} but the tower gives "
                        f"{vision.image_token_len} features per image")
    folder = getattr(datamodule, "vision_encoder", None)
    if folder is not None and Path(folder).resolve() != Path(vision_encoder).resolve():
        problems.append(f"--data.vision_encoder {folder} but --model.vision_encoder {vision_encoder}: images must be "
                        f"preprocessed for the tower that reads them")
    if problems:
        raise UserError("the data do not fit the vision-language model: " + "; ".join(problems))
