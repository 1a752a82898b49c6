"""MiniMind-V: the shared MiniMind language model reading images through a frozen tower and a trained projector.

Parameter names are MiniMind-V's ``.pth``: the language model's ``model.*`` / ``lm_head.*`` and the projector's
``vision_proj.*``. The tower is held outside the module tree: it is never in ``state_dict()``, ``parameters()``
(so never in an optimizer or DDP's gradient sync) or a checkpoint, as MiniMind-V never saves ``vision_encoder.*``;
it follows the model's device when it runs.

Shape letters: B rows, T tokens, N images per row, L features per image, F tower width, C hidden size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimind_pl.config import ModelConfig
from minimind_pl.model import CausalLMOutput, MiniMindForCausalLM
from minimind_pl.vision.config import VisionConfig
from minimind_pl.vision.tower import VisionTower


class VisionProjector(nn.Module):
    """Tower features (…, F) -> language model embeddings (…, C).

    The inner module's attribute name is the one MiniMind-V's ``.pth`` keys use: ``vision_proj.mlp.{0,1,3}``
    (minimind-3v: LayerNorm, Linear, GELU, Linear) and ``vision_proj.vision_proj.0`` (MiniMind2-V: one Linear).
    """

    def __init__(self, vision: VisionConfig, hidden_size: int) -> None:
        super().__init__()
        self.kind = vision.projector
        if vision.projector == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(vision.image_hidden_size),
                                     nn.Linear(vision.image_hidden_size, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, hidden_size))
        else:
            self.vision_proj = nn.Sequential(nn.Linear(vision.image_hidden_size, hidden_size))

    def forward(self, features: Tensor) -> Tensor:
        return (self.mlp if self.kind == "mlp" else self.vision_proj)(features)


def merge_image_features(input_ids: Tensor, embeds: Tensor, features: Tensor, image_token_id: int) -> Tensor:
    """Rows of token embeddings with image features in place of the image placeholders.

    input_ids (B, T), embeds (B, T, C), features (B, N, L, C) -> (B, T, C). MiniMind-V's rule: the k-th run of
    ``image_token_id`` in a row takes the row's k-th image, feature by feature; a run shorter than L (cut by
    truncation) takes the first features; runs beyond the row's N images stay token embeddings, and so images
    no run asks for (a row's zero padding) are unused. One extension: a run longer than L is consecutive images
    (``<image><image>`` written without a separator), where MiniMind-V would drop the run's tail and shorten the
    row. Vectorised, no host sync: positions pick (image, feature) by index and ``torch.where`` merges.
    """
    b, t = input_ids.shape
    n, length = features.shape[1], features.shape[2]
    is_image = input_ids == image_token_id  # (B, T)
    run_start = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # first placeholder of each run
    position = torch.arange(t, device=input_ids.device).expand(b, t)
    offset = position - torch.where(run_start, position, 0).cummax(dim=1).values  # place inside the run
    image = (is_image & (offset % length == 0)).cumsum(dim=1) - 1  # which of the row's images
    used = is_image & (image < n)
    rows = torch.arange(b, device=input_ids.device)[:, None]
    picked = features[rows, image.clamp(0, n - 1), offset % length]  # (B, T, C)
    return torch.where(used[..., None], picked.to(embeds.dtype), embeds)


class MiniMindVLM(MiniMindForCausalLM):
    """The language model plus ``vision_proj``; ``tower`` (optional until images are given) reads the pixels.

    ``forward(input_ids, ..., pixel_values=(B, N, 3, H, W))`` returns the text model's ``CausalLMOutput``.
    Images enter only at prefill: with a KV cache there are no placeholders left to fill.
    """

    def __init__(self, config: ModelConfig, vision: VisionConfig, tower: Optional[VisionTower] = None) -> None:
        super().__init__(config)
        self.vision_config = vision
        self.vision_proj = VisionProjector(vision, config.hidden_size)
        self.vision_proj.apply(self._init_weights)
        self.attach_tower(tower)

    def attach_tower(self, tower: Optional[VisionTower]) -> None:
        """Use ``tower`` (kept out of the module tree: see the module doc); its features must be this model's
        ``image_hidden_size`` wide."""
        if tower is not None and tower.config.hidden_size != self.vision_config.image_hidden_size:
            raise ValueError(f"the vision tower gives {tower.config.hidden_size}-wide features, the projector reads "
                             f"{self.vision_config.image_hidden_size}")
        self.__dict__["tower"] = tower  # a plain attribute, not a submodule

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, N, 3, H, W) -> projected features (B, N, L, C)."""
        if self.tower is None:
            raise ValueError("this model has no vision tower: load it with vision_encoder=DIR (a SigLIP / CLIP "
                             "folder) or call attach_tower")
        b, n = pixel_values.shape[:2]
        if next(self.tower.parameters()).device != pixel_values.device:
            self.tower.to(pixel_values.device)
        features = self.tower(pixel_values.flatten(0, 1))  # (B*N, L, F), no gradients
        projected = self.vision_proj(features.to(self.vision_proj_dtype()))  # (B*N, L, C)
        return projected.view(b, n, *projected.shape[1:])

    def vision_proj_dtype(self) -> torch.dtype:
        return next(self.vision_proj.parameters()).dtype

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor, embeds: Optional[Tensor] = None) -> Tensor:
        """The rows' token embeddings (or ``embeds``) (B, T, C) with ``pixel_values``' projected features in place
        of the placeholder runs."""
        if pixel_values.dim() != 5 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values must be (batch, images, 3, H, W) with batch {input_ids.shape[0]}, "
                             f"got {tuple(pixel_values.shape)}")
        embeds = self.model.embed_tokens(input_ids) if embeds is None else embeds
        return merge_image_features(input_ids, embeds, self.image_features(pixel_values),
                                    self.vision_config.image_token_id)

    def forward(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None, **kwargs: Any) -> CausalLMOutput:
        """The text model's forward (``MiniMindForCausalLM.forward``: its other arguments by keyword) with
        ``pixel_values`` (B, N, 3, H, W): row b's images in the order of its placeholder runs, zero-padded to the
        batch's most images."""
        if pixel_values is not None:
            if kwargs.get("past_key_values"):
                raise ValueError("pixel_values with past_key_values: images enter at prefill only")
            kwargs["inputs_embeds"] = self.embed_inputs(input_ids, pixel_values, kwargs.get("inputs_embeds"))
        return super().forward(input_ids, **kwargs)
