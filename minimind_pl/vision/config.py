"""What a MiniMind-V model adds to the language model's ``ModelConfig``: its image placeholder and projector.

Two generations (jingyaogong/minimind-v): minimind-3v (model/model_vlm.py today: SigLIP2 siglip2-base-p32-256-ve,
64 patch features of width 768 per image, the projector LayerNorm → Linear → GELU → Linear, the placeholder
``<|image_pad|>`` = token 12) and MiniMind2-V (commit 32cf4c5: CLIP clip-vit-base-patch16, 196 patch features
without the class token, one Linear, the placeholder ``@`` = token 34).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minimind_pl.errors import UserError

PROJECTORS = ("mlp", "linear")


@dataclass(frozen=True)
class VisionConfig:
    """Args:
        image_token: The placeholder text; the data writes ``image_token * image_token_len`` for each image.
        image_token_id: Its token id: the k-th run of it in a row takes the row's k-th image.
        image_token_len: Features per image (the tower's patches).
        image_hidden_size: The tower's feature width.
        projector: ``mlp`` (minimind-3v: LayerNorm, Linear, GELU, Linear) or ``linear`` (MiniMind2-V).
    """

    image_token: str = "<|image_pad|>"
    image_token_id: int = 12
    image_token_len: int = 64
    image_hidden_size: int = 768
    projector: str = "mlp"

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise UserError(f"projector must be one of {PROJECTORS}, not {self.projector!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VisionConfig":
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown vision config fields {unknown}")
        return cls(**raw)

    @classmethod
    def from_preset(cls, name: str) -> "VisionConfig":
        if name not in VISION_PRESETS:
            raise UserError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
        return VISION_PRESETS[name]


VISION_PRESETS = {
    "minimind-3v": VisionConfig(),
    "minimind2-v": VisionConfig(image_token="@", image_token_id=34, image_token_len=196, projector="linear"),
}
