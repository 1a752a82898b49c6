"""The frozen vision tower: a ViT that reads a Hugging Face SigLIP / SigLIP2 (fixed resolution) / CLIP folder.

Two families, one encoder. SigLIP: patch convolution with bias, learned positions, pre-norm blocks with tanh-GELU,
a final LayerNorm on every patch; MiniMind-V (minimind-3v) takes that ``last_hidden_state`` as it is (64 patches
of siglip2-base-p32-256). CLIP: patch convolution without bias, a class token in front, a LayerNorm before the
blocks (``pre_layrnorm``), quick-GELU; its ``last_hidden_state`` has no final norm (CLIP normalises only the pooled
class token), and MiniMind2-V drops the class token: 196 patches of clip-vit-base-patch16. The attention pooling
head of SigLIP and CLIP's ``post_layernorm`` / text model are not used and not loaded.

Parameter names are transformers' (the folder's ``vision_model.*`` tensors without that prefix), so the file
loads as it is. Shape letters: N images, P patches, L tokens (P, +1 with CLIP's class token), C width, h heads, d head
width.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimind_pl.checkpoints.files import strip_prefix
from minimind_pl.checkpoints.huggingface import read_hf_weights
from minimind_pl.errors import UserError, refuse_mismatch
from minimind_pl.vision.preprocess import ImageSpec, read_tower_json

VISION_PREFIX = "vision_model."
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
# transformers' defaults for fields a config.json may leave out, per family
FAMILY_DEFAULTS = {
    "siglip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6},
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5},
}
HEAD_WIDTH = 64  # ViT-B's attention heads (clip-vit-base-patch16, siglip2-base): 12 of 64
# transformers' CLIPImageProcessor defaults (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "clip": "clip", "clip_vision_model": "clip"}


@dataclass(frozen=True)
class TowerConfig:
    """The vision encoder's shape, as a Hugging Face ``config.json`` gives it (``family``: siglip or clip)."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, raw: dict, where: str = "config.json") -> "TowerConfig":
        """From a vision config (``siglip_vision_model`` / ``clip_vision_model``) or a whole model's config
        (``siglip`` / ``clip``, whose ``vision_config`` it reads)."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UserError(f"{where}: model_type {model_type!r} is not a vision tower this project reads "
                            f"(SigLIP, SigLIP2 at fixed resolution, or CLIP: {sorted(MODEL_TYPES)})")
        family = MODEL_TYPES[model_type]
        fields = raw.get("vision_config", {}) if model_type == family else raw
        values = {**FAMILY_DEFAULTS[family], **{k: fields[k] for k in FAMILY_DEFAULTS[family] if k in fields}}
        if values["hidden_act"] not in ACTIVATIONS:
            raise UserError(f"{where}: hidden_act {values['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
        if not isinstance(values["image_size"], int) or not isinstance(values["patch_size"], int):
            raise UserError(f"{where}: only square images and patches are supported")
        return cls(family=family, **values)


class TowerAttention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, length, width = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                       self.v_proj))  # (N, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # scale d**-0.5, as both families
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class TowerMLP(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TowerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = TowerAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TowerMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TowerEmbeddings(nn.Module):
    """Patches (and CLIP's class token) plus learned positions: (N, 3, H, W) -> (N, L, C)."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        clip = config.family == "clip"
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=not clip)
        if clip:
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_patches + clip, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, H/p, W/p)
        x = patches.flatten(2).transpose(1, 2)  # (N, P, C), row-major over the patch grid
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (N, 1 + P, C)
        return x + self.position_embedding.weight


class TowerEncoder(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TowerBlock(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """The ``vision_model`` of a SigLIP or CLIP folder, returning the patch features MiniMind-V reads."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TowerEmbeddings(config)
        if config.family == "clip":
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # transformers' spelling
        self.encoder = TowerEncoder(config)
        if config.family == "siglip":
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (N, 3, H, W) -> patch features (N, P, C): SigLIP's normed last hidden state, CLIP's last
        hidden state without the class token."""
        x = self.embeddings(pixel_values)
        if self.config.family == "clip":
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x) if self.config.family == "siglip" else x[:, 1:]


class VisionTower(nn.Module):
    """A frozen :class:`VisionTransformer` loaded from a folder, with the folder's image preprocessing.

    ``vision_model`` holds the weights (the folder's names); ``image_spec`` turns a Pillow image
    into the tensor it reads; ``folder`` and ``fingerprint`` say which tower it is (checkpoints record them).
    """

    def __init__(self, config: TowerConfig, image_spec: ImageSpec, folder: str = "", fingerprint: str = "") -> None:
        super().__init__()
        self.vision_model = VisionTransformer(config)
        self.image_spec, self.folder, self.fingerprint = image_spec, folder, fingerprint
        self.requires_grad_(False)
        self.eval()

    @property
    def config(self) -> TowerConfig:
        return self.vision_model.config

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(False)  # frozen: always in eval mode, whatever the model around it does

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, P, C) patch features, without gradients."""
        return self.vision_model(pixel_values)


def tower_weights(folder: str | Path) -> dict[str, Tensor]:
    """The vision encoder's tensors of a tower folder (:func:`vision_tensors`)."""
    return vision_tensors(read_hf_weights(folder), str(folder))


def vision_tensors(weights: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The vision encoder's tensors of a SigLIP / CLIP state dict, named without ``vision_model.``: transformers 4
    saves a vision model's tensors under that prefix, transformers 5 without it; a whole CLIP / SigLIP model's
    text side is left out."""
    vision = strip_prefix(weights, VISION_PREFIX)
    if not vision and any(k.startswith(("embeddings.", "encoder.")) for k in weights):
        vision = {k: v for k, v in weights.items() if not k.startswith(("text_model.", "logit_", "visual_projection",
                                                                      "text_projection"))}
    if not vision:
        raise UserError(f"{where} holds no vision encoder weights (vision_model.* or embeddings.* / encoder.*): "
                        f"is it a SigLIP or CLIP vision tower folder?")
    return vision


def weights_fingerprint(weights: dict[str, Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: the same tower in another file
    format (safetensors or .bin) has the same fingerprint, any changed weight another one."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_tower_config(folder: str | Path) -> TowerConfig:
    path, raw = read_tower_json(folder, "config.json")
    return TowerConfig.from_hf(raw, str(path))


def load_vision_tower(folder: str | Path) -> VisionTower:
    """The frozen tower of a Hugging Face SigLIP / SigLIP2 (fixed resolution) / CLIP folder, float32, on the CPU."""
    config = read_tower_config(folder)
    weights = tower_weights(folder)
    return filled_tower(config, ImageSpec.from_folder(folder), weights, str(folder))


def tower_from_weights(weights: dict[str, Tensor], where: str) -> VisionTower:
    """The frozen tower held in a state dict without its folder (a MiniMind-V model folder saved with its
    ``vision_encoder.*``, that prefix already taken off). There is no config.json or preprocessor_config.json:
    the shapes give the family (CLIP's class embedding), width, layers, MLP width, patch size and resolution
    (positions); the heads are the width / 64 (both MiniMind-V towers, ViT-B/16 and SigLIP2 base, have 64-wide
    heads); activation and LayerNorm eps are the family's; the preprocessing is transformers' image processor
    defaults for the family at that resolution (SigLIP: bicubic resize to the square, mean = std = 0.5; CLIP:
    bicubic resize of the short side, centre crop, CLIP's mean and std). A tower folder, when given, is exact."""
    vision = vision_tensors(weights, where)
    config = config_from_weights(vision, where)
    return filled_tower(config, default_image_spec(config), vision, where)


def config_from_weights(vision: dict[str, Tensor], where: str) -> TowerConfig:
    """A tower's config read off its tensors (see :func:`tower_from_weights`)."""
    try:
        patch = vision["embeddings.patch_embedding.weight"]  # (C, channels, p, p)
        family = "clip" if "embeddings.class_embedding" in vision else "siglip"
        positions = vision["embeddings.position_embedding.weight"].shape[0] - (family == "clip")
        intermediate = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as missing:
        raise UserError(f"{where}: the vision encoder's tensors lack {missing}: not a SigLIP / CLIP tower") from None
    layers = {int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")}
    side, width = math.isqrt(positions), patch.shape[0]
    if side * side != positions or width % HEAD_WIDTH:
        raise UserError(f"{where}: a tower of {positions} patches and width {width} is not a square grid of 64-wide "
                        "heads; give its folder (vision_encoder=DIR)")
    defaults = FAMILY_DEFAULTS[family]
    return TowerConfig(family=family, hidden_size=width, intermediate_size=intermediate,
                       num_hidden_layers=max(layers) + 1, num_attention_heads=width // HEAD_WIDTH,
                       num_channels=patch.shape[1], image_size=side * patch.shape[2], patch_size=patch.shape[2],
                       hidden_act=defaults["hidden_act"], layer_norm_eps=defaults["layer_norm_eps"])


def default_image_spec(config: TowerConfig) -> ImageSpec:
    """transformers' SiglipImageProcessor / CLIPImageProcessor defaults at ``config``'s resolution."""
    size = config.image_size
    if config.family == "clip":
        return ImageSpec(height=size, width=size, mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=size)
    return ImageSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def filled_tower(config: TowerConfig, image_spec: ImageSpec, weights: dict[str, Tensor], where: str) -> VisionTower:
    """A :class:`VisionTower` of ``config`` holding ``weights`` (float32), fingerprinted; a UserError naming
    ``where`` when tensors are missing or do not fit the config."""
    tower = VisionTower(config, image_spec, where, weights_fingerprint(weights))
    state = {k: v.float() for k, v in weights.items()}
    own = tower.vision_model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise UserError(f"{where} is missing tower weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    shapes = [f"{k}: file {tuple(state[k].shape)}, config {tuple(own[k].shape)}"
              for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise UserError(f"{where}: tower weights do not fit its config: {shapes[:3]}")
    tower.vision_model.load_state_dict({k: state[k] for k in own})  # the pooling head etc. stay unread
    return tower


# What a vision-language stage checkpoint records about its tower (the stages write it with tower_record)
TOWER_RECORD_KEYS = ("vision_encoder", "vision_encoder_fingerprint")


def tower_record(tower: VisionTower) -> dict[str, str]:
    """The checkpoint entries that name ``tower``: its folder and the fingerprint of its weights, not the
    weights (a frozen tower is never saved, as in MiniMind-V)."""
    return dict(zip(TOWER_RECORD_KEYS, (str(tower.folder), tower.fingerprint)))


def check_same_tower(recorded: str | None, tower: VisionTower, model: str, allow: bool = False,
                     flag: str = "--allow_vision_encoder_mismatch true") -> None:
    """Refuse (``allow``: warn about) a tower whose weights are not those ``model`` was trained with; nothing is
    checked when no fingerprint was recorded (MiniMind-V's .pth files)."""
    if recorded is None or recorded == tower.fingerprint:
        return
    message = (f"{model} was trained with another vision tower than {tower.folder} (weight fingerprints "
               f"{recorded[:12]} != {tower.fingerprint[:12]}): its projector would read features it never saw")
    refuse_mismatch(message, "Give the vision encoder folder it was trained with", allow, flag)


# ----------------------------------------------------------------------------- writing a SigLIP folder

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)  # SigLIP's image processors normalise to [-1, 1]


def tower_image_spec(image_size: int) -> ImageSpec:
    """The preprocessing of the trained tower (SigLIP's: bicubic resize to a square, to [-1, 1])."""
    return ImageSpec(height=image_size, width=image_size, mean=SIGLIP_MEAN_STD, std=SIGLIP_MEAN_STD)


def save_tower_folder(vision: VisionTransformer, spec: ImageSpec, folder: str | Path) -> Path:
    """A SigLIP ``VisionTransformer`` as a Hugging Face ``siglip_vision_model`` folder: config.json (without the
    attention-pooling head, which MiniMind-V never reads), model.safetensors (``vision_model.*`` names, float32)
    and preprocessor_config.json (``spec``: resize straight to a square, rescale, normalise)."""
    from safetensors.torch import save_file

    config = vision.config
    if config.family != "siglip" or spec.shortest_edge is not None or spec.resample != "bicubic":
        raise UserError("only a SigLIP tower with SigLIP's preprocessing (bicubic resize to a square) is written")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                 "vision_use_head": False, **{k: getattr(config, k) for k in (
                     "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size", "hidden_act", "layer_norm_eps")}}
    processor = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                 "size": {"height": spec.height, "width": spec.width}, "resample": 3, "do_rescale": True,
                 "rescale_factor": spec.rescale, "do_normalize": True, "image_mean": list(spec.mean),
                 "image_std": list(spec.std)}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    state = {VISION_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in vision.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
