"""SigLIP: train a small vision tower from scratch on (image, caption) pairs, to be frozen in a VLM afterwards.

MiniMind-V freezes a pretrained SigLIP2 tower; none can be downloaded for the demo, and a frozen random tower
teaches a VLM nothing. This stage trains one with SigLIP's own objective (``losses.siglip_loss``): a ViT
(``vision.tower.VisionTransformer``, SigLIP family) and a text tower (the shared ``MiniMindForCausalLM`` backbone)
embed each image and its caption; every image is scored against every caption of the batch.

* Image embedding: the mean of the tower's patch features (its ``last_hidden_state``, what a VLM reads),
  projected by ``image_head``. Text embedding: the final hidden state of the caption's last token (``<eos>``
  appended), projected by ``text_head``. Both heads and the learnable ``logit_scale`` / ``logit_bias`` live only in
  the stage's checkpoint.
* ``tower_folder``: at the end of training the tower is written as a Hugging Face SigLIP vision folder
  (``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``) that ``vision.tower.load_vision_tower``
  (and transformers' ``SiglipVisionModel``) read back.
* Data: ``data.image_captions.ImageCaptionDataModule`` reads VLM jsonl rows (``{"conversations": [...], "images": [...]}``); a pair is
  a row's first image and its first assistant answer. Images are decoded and preprocessed in the loader workers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from minimind_pl.data.image_captions import ImageCaptionPairs
from minimind_pl.errors import UserError
from minimind_pl.losses import siglip_loss
from minimind_pl.stages.base import Stage
from minimind_pl.vision.tower import TowerConfig, VisionTransformer, save_tower_folder, tower_image_spec

# ----------------------------------------------------------------------------- the stage

def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, same_text: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether each image's best-scoring text (cosine) is one equal to its own. ``same_text`` (N, N)
    says which texts are equal (identical captions are all right answers)."""
    scores = nn.functional.normalize(image_emb, dim=-1) @ nn.functional.normalize(text_emb, dim=-1).T  # (N, N)
    best = scores.argmax(dim=-1)
    return same_text[torch.arange(len(best), device=best.device), best]


def same_rows(ids: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: which rows of a (B, T) tensor are equal."""
    return (ids[:, None, :] == ids[None, :, :]).all(dim=-1)


@torch.no_grad()
def retrieval_accuracy(stage: "SigLIP", pairs: ImageCaptionPairs, batch_size: int = 256) -> tuple[float, float]:
    """Image->caption retrieval over a whole set: ``(accuracy, chance)``. Each image ranks every caption of the set;
    it is right when the best one is its own caption's text. Chance: the expected accuracy of a random ranking
    (the share of captions equal to an image's own, averaged over the images)."""
    was_training = stage.training
    stage.eval()
    image_emb, text_emb = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        batch = {k: v.to(stage.device) for k, v in batch.items()}
        image_emb.append(stage.image_embedding(batch["pixel_values"]))
        text_emb.append(stage.text_embedding(batch["input_ids"], batch["last_index"]))
    stage.train(was_training)
    index = {caption: n for n, caption in enumerate(dict.fromkeys(pairs.captions))}
    caption_ids = torch.tensor([index[c] for c in pairs.captions], device=stage.device)
    same = caption_ids[:, None] == caption_ids[None, :]
    hits = retrieval_hits(torch.cat(image_emb), torch.cat(text_emb), same)
    return hits.float().mean().item(), same.float().mean().item()


class SigLIP(Stage):
    """A ViT and the MiniMind text backbone trained together with SigLIP's sigmoid loss; the ViT is the product."""

    VAL_METRICS = ("loss", "retrieval")
    PROGRESS_METRICS = ("loss", "retrieval")

    def __init__(self, image_size: int = 64, patch_size: int = 16, tower_hidden_size: int = 64,
                 tower_layers: int = 2, tower_heads: int = 4, tower_intermediate_size: int = 256,
                 embed_dim: int = 64, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 tower_folder: Optional[str] = None, learning_rate: float = 5e-4, **kwargs: Any) -> None:
        """Build the vision tower, the text tower (``config``) and the two projection heads.

        Args:
            image_size: Side of the square images the tower reads (the data's ``image_size``).
            patch_size: Side of a patch: the tower gives (image_size / patch_size)² patch features.
            tower_hidden_size: Width of the tower (its patch features).
            tower_layers: Transformer blocks of the tower.
            tower_heads: Attention heads of the tower.
            tower_intermediate_size: Width of the tower's MLP.
            embed_dim: Width of the shared image-text embedding space.
            init_logit_scale: Initial log temperature (SigLIP: log 10).
            init_logit_bias: Initial bias (SigLIP: -10, so that the many negative pairs start near their target).
            tower_folder: Where the trained tower is written as a Hugging Face SigLIP vision folder when training
                ends (config.json, model.safetensors, preprocessor_config.json); None writes nothing.
            learning_rate: Peak learning rate of AdamW.
            kwargs: The arguments of ``Stage`` (``config`` of the text tower, ``init_weights`` to start it from a
                pretrained MiniMind, ...).
        """
        super().__init__(learning_rate=learning_rate, **kwargs)
        if image_size % patch_size:
            raise UserError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.tower_config = TowerConfig(
            family="siglip", hidden_size=tower_hidden_size, intermediate_size=tower_intermediate_size,
            num_hidden_layers=tower_layers, num_attention_heads=tower_heads, num_channels=3, image_size=image_size,
            patch_size=patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        self.vision = VisionTransformer(self.tower_config)
        self.image_head = nn.Linear(self.tower_config.num_patches * tower_hidden_size, embed_dim)
        self.text_head = nn.Linear(self.config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def image_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim): all patch features, concatenated and projected."""
        if tuple(pixel_values.shape[-2:]) != (self.tower_config.image_size,) * 2:
            raise UserError(f"images of {tuple(pixel_values.shape[-2:])} pixels reach a tower of image_size "
                            f"{self.tower_config.image_size}: set --data.image_size to --model.image_size")
        return self.image_head(self.vision(pixel_values).flatten(1))  # (B, P * C) -> (B, D)

    def text_embedding(self, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded captions -> (B, embed_dim): the final hidden state of each last token, projected
        (causal attention: padding after it is never seen)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.model.model(input_ids, positions)[0]  # (B, T, C)
        return self.text_head(hidden[torch.arange(len(input_ids), device=hidden.device), last_index])

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SigLIP's loss over the batch's B² image-caption pairs; logs the temperature, the bias and the in-batch
        image->caption retrieval accuracy."""
        image_emb = self.image_embedding(batch["pixel_values"])
        text_emb = self.text_embedding(batch["input_ids"], batch["last_index"])
        loss = siglip_loss(image_emb, text_emb, self.logit_scale, self.logit_bias)
        hits = retrieval_hits(image_emb.detach(), text_emb.detach(), same_rows(batch["input_ids"]))
        return loss, {"retrieval": hits.float().mean(), "temperature": self.logit_scale.detach().exp(),
                      "bias": self.logit_bias.detach()}

    def validation_values(self, batch: dict[str, torch.Tensor], loss: torch.Tensor,
                          logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": loss.detach(), "retrieval": logs["retrieval"]}

    def validation_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(float(len(batch["input_ids"])))

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """As the base's, with the temperature and the bias never decayed."""
        decayed, rest = super().parameter_groups()
        scalars = [self.logit_scale, self.logit_bias]
        return [[p for p in decayed if all(p is not s for s in scalars)], rest + scalars]

    def on_train_end(self) -> None:
        """Write the tower folder (rank 0) when ``tower_folder`` is set."""
        if self.hparams.tower_folder:
            self.save_tower(self.hparams.tower_folder)

    @rank_zero_only
    def save_tower(self, folder: str | Path) -> Path:
        """Write the tower as a Hugging Face SigLIP vision folder; returns it."""
        return save_tower_folder(self.vision, tower_image_spec(self.tower_config.image_size), folder)
