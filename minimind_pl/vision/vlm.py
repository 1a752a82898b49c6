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


def image_slots(input_ids: Tensor, image_token_id: int, image_token_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which image and which of its features each position of the rows stands for (MiniMind-V's rule, see
    ``merge_image_features``): ``is_image`` (B, T) bool, ``image`` (B, T) the row's image index (-1 before its first
    run), ``feature`` (B, T) the feature index in [0, L). Vectorised, no host sync."""
    b, t = input_ids.shape
    length = image_token_len
    is_image = input_ids == image_token_id  # (B, T)
    run_start = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # first placeholder of each run
    position = torch.arange(t, device=input_ids.device).expand(b, t)
    offset = position - torch.where(run_start, position, 0).cummax(dim=1).values  # place inside the run
    # a run at the row's first position shorter than L is the tail of an image cut by the previous row's end
    # (packing): its tokens stand for that image's last features
    leading = is_image.long().cumprod(dim=1).sum(dim=1, keepdim=True)  # (B, 1) length of the run at position 0
    tail = (leading > 0) & (leading < length) & (position < leading)
    feature = torch.where(tail, offset + length - leading, offset) % length
    image = (is_image & ((offset % length == 0) | run_start)).cumsum(dim=1) - 1
    return is_image, image, feature


def images_used(input_ids: Tensor, image_token_id: int, image_token_len: int, images: int) -> Tensor:
    """(B, N) bool: which of the rows' ``images`` slots a placeholder run takes (the others are a batch's zero
    padding, or images beyond the row's runs: the tower need not read them)."""
    is_image, image, _ = image_slots(input_ids, image_token_id, image_token_len)
    count = torch.where(is_image, image + 1, 0).amax(dim=1, keepdim=True)  # (B, 1) images the row's runs take
    return torch.arange(images, device=input_ids.device) < count


def merge_image_features(input_ids: Tensor, embeds: Tensor, features: Tensor, image_token_id: int) -> Tensor:
    """Rows of token embeddings with image features in place of the image placeholders.

    input_ids (B, T), embeds (B, T, C), features (B, N, L, C) -> (B, T, C). MiniMind-V's rule: the k-th run of
    ``image_token_id`` in a row takes the row's k-th image, feature by feature; a run shorter than L cut by the row's
    end (truncation) takes the first features; runs beyond the row's N images stay token embeddings, and so images
    no run asks for (a row's zero padding) are unused. Two extensions: a run longer than L is consecutive images
    (``<image><image>`` written without a separator), where MiniMind-V would drop the run's tail and shorten the
    row; a run shorter than L at the row's first position is the rest of an image whose first tokens ended the
    previous packed row, and takes that image's last features (the data gives that image to both rows).
    Vectorised, no host sync: positions pick (image, feature) by index and ``torch.where`` merges.
    """
    b, n, length = features.shape[:3]
    is_image, image, feature = image_slots(input_ids, image_token_id, length)
    used = is_image & (image < n)
    rows = torch.arange(b, device=input_ids.device)[:, None]
    picked = features[rows, image.clamp(0, n - 1), feature]  # (B, T, C)
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

    def image_features(self, pixel_values: Tensor, used: Optional[Tensor] = None) -> Tensor:
        """pixel_values (B, N, 3, H, W) -> projected features (B, N, L, C); ``used`` (B, N) bool: only those images
        go through the tower and the projector (the others' features are zeros), e.g. not a batch's zero padding."""
        if self.tower is None:
            raise ValueError("this model has no vision tower: load it with vision_encoder=DIR (a SigLIP / CLIP "
                             "folder) or call attach_tower")
        b, n = pixel_values.shape[:2]
        if next(self.tower.parameters()).device != pixel_values.device:
            self.tower.to(pixel_values.device)
        if used is None:
            used = torch.ones(b, n, dtype=torch.bool, device=pixel_values.device)
        selected = pixel_values[used]  # (used images, 3, H, W)
        if len(selected):
            features = self.tower(selected)  # (used images, L, F), no gradients
        else:  # no run takes an image: the tower cannot run on none; the projector still joins the graph
            vision = self.vision_config
            features = pixel_values.new_zeros(0, vision.image_token_len, vision.image_hidden_size)
        projected = self.vision_proj(features.to(self.vision_proj_dtype()))  # (used images, L, C)
        # scatter back: zeros for the unused slots (a projector-free zero, so an all-unused batch still has the
        # projector in its graph)
        out = projected.new_zeros(b, n, *projected.shape[1:])
        out[used] = projected
        return out

    def vision_proj_dtype(self) -> torch.dtype:
        return next(self.vision_proj.parameters()).dtype

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor, embeds: Optional[Tensor] = None) -> Tensor:
        """The rows' token embeddings (or ``embeds``) (B, T, C) with ``pixel_values``' projected features in place
        of the placeholder runs."""
        if pixel_values.dim() != 5 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values must be (batch, images, 3, H, W) with batch {input_ids.shape[0]}, "
                             f"got {tuple(pixel_values.shape)}")
        embeds = self.model.embed_tokens(input_ids) if embeds is None else embeds
        vision = self.vision_config
        used = images_used(input_ids, vision.image_token_id, vision.image_token_len, pixel_values.shape[1])
        return merge_image_features(input_ids, embeds, self.image_features(pixel_values, used), vision.image_token_id)

    def forward(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None, **kwargs: Any) -> CausalLMOutput:
        """The text model's forward (``MiniMindForCausalLM.forward``: its other arguments by keyword) with
        ``pixel_values`` (B, N, 3, H, W): row b's images in the order of its placeholder runs, zero-padded to the
        batch's most images."""
        if pixel_values is not None:
            if kwargs.get("past_key_values"):
                raise ValueError("pixel_values with past_key_values: images enter at prefill only")
            kwargs["inputs_embeds"] = self.embed_inputs(input_ids, pixel_values, kwargs.get("inputs_embeds"))
        return super().forward(input_ids, **kwargs)
