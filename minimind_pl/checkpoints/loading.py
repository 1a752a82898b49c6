"""Open any supported checkpoint once and get everything needed to use it.

:func:`open_checkpoint` reads a file (or folder) a single time and returns a :class:`Checkpoint`: the
transformer's weights in MiniMind's names, the model config when the file records one, the tokenizer
folder it was trained with, and the LoRA adapters to put on top. It accepts

- a Lightning ``.ckpt`` of any stage (weights under ``state_dict`` with the stage's ``model.`` prefix,
  the config under ``model_config``, the tokenizer under ``hyper_parameters.tokenizer``),
- a LoRA stage checkpoint or adapter file (its recorded base is opened for the weights),
- a MiniMind ``.pth`` (a bare state dict; no config: a preset or the tensor shapes give it), MiniMind-V's
  included (``vision_proj.*`` weights: the projector's shapes give the generation, the tower is a folder given
  as ``vision_encoder``, never in the file),
- a Hugging Face folder (``config.json`` + weights), as written by ``export`` or MiniMind, MiniMind-V's
  included (``model_type: minimind-v``, written by its ``scripts/convert_vlm.py``: the LM and ``vision_proj.*``,
  the placeholder in config.json; the tower is ``vision_encoder`` if given, else the folder's own
  ``vision_encoder.*`` tensors if it was saved with them, else none: text only),
- a checkpoint folder of a sharded strategy (FSDP ``state_dict_type="sharded"``, DeepSpeed), consolidated in
  memory (``checkpoints.sharded``).

:func:`load_model` (the public ``minimind_pl.load_model``) builds the model from it in eval mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from minimind_pl.checkpoints.adapters import LoRAFile, adapter_from_raw, apply_adapter, is_adapter, read_lora_file, resolve_base
from minimind_pl.checkpoints.files import STAGE_PREFIX, nonfinite_tensors, read_torch_file, strip_prefix
from minimind_pl.checkpoints.huggingface import config_from_hf, read_config_json, read_hf_weights
from minimind_pl.checkpoints.minimind import PROJECTOR_PREFIX, hf_vision_config, infer_config, infer_vision_config
from minimind_pl.checkpoints.sharded import read_sharded_folder
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError, refuse_mismatch
from minimind_pl.lora import merge_lora
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.tokenizer import Tokenizer
from minimind_pl.vision.config import VisionConfig


MINIMIND_V_TYPE = "minimind-v"  # config.json's model_type of MiniMind-V's transformers folders
TOWER_PREFIX = "vision_encoder."  # where MiniMind-V's model holds its tower, in a folder saved with it


@dataclass
class Checkpoint:
    """What one checkpoint holds, read once.

    Args:
        path: The file or folder as given.
        weights: The base transformer's weights in MiniMind's parameter names (CPU, possibly memory-mapped).
        model_config: The recorded ``ModelConfig`` as a dict; None for a MiniMind ``.pth``.
        tokenizer_dir: The tokenizer folder the model was trained with, when recorded.
        adapter: LoRA adapters to put on top of ``weights`` (a LoRA checkpoint, or ``lora=`` given).
        adapter_path: Where the adapters were read from.
        stage: The training stage that wrote a Lightning checkpoint (``Pretrain``, ``SFT``, ...).
        tokenizer_fingerprint: ``Tokenizer.vocabulary_fingerprint`` of the tokenizer it was trained with, when
            recorded (stage checkpoints since it existed).
        vision_config: The recorded ``VisionConfig`` of a vision-language checkpoint as a dict; None when not
            recorded (a MiniMind-V ``.pth``: read off the projector) or a text model.
        vision_encoder: The vision tower folder a vision-language stage checkpoint recorded
            (``vision.tower.tower_record``).
        vision_encoder_fingerprint: ``weights_fingerprint`` of that tower's weights, when recorded.
        tower_weights: The tower's own tensors when the file holds them (a MiniMind-V transformers folder saved
            with its ``vision_encoder.*``; that prefix taken off), used when no tower folder is given.
    """

    path: str
    weights: dict[str, torch.Tensor]
    model_config: Optional[dict[str, Any]] = None
    tokenizer_dir: Optional[str] = None
    adapter: Optional[LoRAFile] = None
    adapter_path: Optional[str] = None
    stage: Optional[str] = None
    tokenizer_fingerprint: Optional[str] = None
    vision_config: Optional[dict[str, Any]] = None
    vision_encoder: Optional[str] = None
    vision_encoder_fingerprint: Optional[str] = None
    tower_weights: Optional[dict[str, torch.Tensor]] = None

    @property
    def is_vision_language(self) -> bool:
        """A MiniMind-V model: the projector's weights are there."""
        return self.vision_config is not None or any(k.startswith(PROJECTOR_PREFIX) for k in self.weights)

    def config(self, preset: Optional[str] = None) -> ModelConfig:
        """The model config: recorded (for a LoRA adapter on a ``.pth``, the base config the adapter recorded),
        else the ``preset``, else read off the tensor shapes."""
        if self.model_config is not None:
            return ModelConfig.from_dict(self.model_config)
        if preset is not None:
            return ModelConfig.from_preset(preset)
        return ModelConfig.from_dict(infer_config(self.language_weights()))

    def language_weights(self) -> dict[str, torch.Tensor]:
        """The weights without a vision-language model's projector."""
        return {k: v for k, v in self.weights.items() if not k.startswith(PROJECTOR_PREFIX)}

    def build_model(self, preset: Optional[str] = None, merge: bool = False, device: str = "cpu",
                    inference_rope_scaling: bool = False,
                    vision_encoder: Optional[str | Path] = None) -> MiniMindForCausalLM:
        """The transformer with these weights (float32, eval mode) on ``device`` (``auto``: CUDA when
        available); the adapters on top, folded into the weights if ``merge``. ``inference_rope_scaling`` turns
        YaRN on (MiniMind's settings) whatever the recorded config says; False keeps the recorded setting.
        A vision-language checkpoint gives a ``MiniMindVLM`` whose tower is ``vision_encoder`` (default: the
        recorded folder, else the tower tensors the file holds; none: the model reads text only until
        ``attach_tower``)."""
        config = self.config(preset)
        if inference_rope_scaling:
            config = dataclasses.replace(config, inference_rope_scaling=True)
        if self.is_vision_language:
            model = self._vision_language_model(config, vision_encoder or self.vision_encoder)
        elif vision_encoder is not None:
            raise UserError(f"{self.path} is a text model (no vision_proj.* weights): a vision encoder needs a "
                            f"MiniMind-V checkpoint")
        else:
            model = MiniMindForCausalLM(config)
        model.load_weights({k: v.float() for k, v in self.weights.items()}, strict=True)
        if self.adapter is not None:
            apply_adapter(model, self.adapter, self.adapter_path or self.path)
            if merge:
                merge_lora(model)
        return model.to(pick_device(device)).eval()

    def _vision_language_model(self, config: ModelConfig, folder: Optional[str | Path]) -> MiniMindForCausalLM:
        """A MiniMindVLM for ``config``: the tower from ``folder`` (checked against a recorded fingerprint), the
        vision config recorded or read off the projector (features per image: the tower's)."""
        from minimind_pl.vision.tower import check_same_tower, load_vision_tower, tower_from_weights  # vision.tower
        from minimind_pl.vision.vlm import MiniMindVLM  # reads through checkpoints.huggingface: imported here

        if folder is not None:
            tower = load_vision_tower(folder)
        else:
            tower = tower_from_weights(self.tower_weights, self.path) if self.tower_weights else None
        if tower is not None:
            check_same_tower(self.vision_encoder_fingerprint, tower, self.path)
        vision = VisionConfig.from_dict(self.vision_config or infer_vision_config(
            self.weights, tower.config.num_patches if tower is not None else None))
        try:
            return MiniMindVLM(config, vision, tower)
        except ValueError as error:
            raise UserError(f"{self.path} with the vision encoder {folder}: {error}") from None

    def tokenizer(self, override: Optional[str] = None, allow_mismatch: bool = False) -> Tokenizer:
        """``override`` if given, else the recorded tokenizer; a clear error if neither, or if it is not the
        tokenizer the model was trained with (a warning with ``allow_mismatch``)."""
        directory = override or self.tokenizer_dir or self.tokenizer_beside()
        tokenizer = Tokenizer.from_file(directory)
        check_same_tokenizer(self.tokenizer_fingerprint, tokenizer.vocabulary_fingerprint, self.path, directory,
                             allow_mismatch, "--allow_tokenizer_mismatch true")
        return tokenizer

    def tokenizer_beside(self) -> str:
        """The tokenizer folder found next to a checkpoint that records none (MiniMind's own ``.pth`` files), in
        the places MiniMind keeps it: the checkpoint's folder, then ``model/`` in it and beside it (MiniMind's
        repository keeps ``out/*.pth`` and the tokenizer in ``model/`` side by side), each also as
        ``model/minimind_tokenizer/`` (MiniMind's releases before MiniMind-3). An error naming the places looked at
        if there is none."""
        candidates = tokenizer_places(Path(self.path).parent)
        for candidate in candidates:
            if (candidate / "tokenizer.json").is_file():
                return str(candidate)
        looked = ", ".join(str(c) for c in candidates)
        raise UserError(f"no tokenizer is recorded with {self.path} and none was found beside it (looked for "
                        f"tokenizer.json in {looked}); pass --tokenizer DIR")


def tokenizer_places(folder: Path) -> list[Path]:
    """Where MiniMind's layouts keep the tokenizer of weights in ``folder``, nearest first, without repeats."""
    places = [folder]
    for model_dir in (folder / "model", folder.parent / "model"):
        places += [model_dir, model_dir / "minimind_tokenizer"]
    return list(dict.fromkeys(places))


def open_checkpoint(path: str | Path, lora: Optional[str | Path] = None) -> Checkpoint:
    """Read ``path`` (see the module doc) and, if given, the adapter file ``lora`` — each exactly once."""
    path = Path(path)
    sharded = read_sharded_folder(path) if path.is_dir() else None
    if sharded is not None:  # a sharded FSDP / DeepSpeed checkpoint: an ordinary stage checkpoint once read
        checkpoint = _from_raw(path, sharded)
    elif path.is_dir():
        checkpoint = _from_hf_folder(path)
    else:
        checkpoint = _from_raw(path, read_torch_file(path))
    check_finite(checkpoint.path, checkpoint.weights)
    if lora is not None:
        if checkpoint.adapter is not None:
            raise UserError(f"{path} is itself a LoRA checkpoint; give its base as the checkpoint and --lora {lora}")
        checkpoint.adapter, checkpoint.adapter_path = read_lora_file(lora), str(lora)
    return checkpoint


def check_same_tokenizer(recorded: Optional[str], current: Optional[str], model: str, tokenizer_dir: str,
                         allow: bool, flag: str) -> None:
    """Refuse (or, with ``allow``, warn about) a tokenizer other than the one ``model`` was trained with.

    ``recorded`` and ``current`` are vocabulary fingerprints; nothing is checked when either is unknown.
    """
    if recorded is None or current is None or recorded == current:
        return
    message = (f"{model} was trained with another tokenizer than the one in {tokenizer_dir} (vocabulary "
               f"fingerprints {recorded[:12]} != {current[:12]}): the same token ids would mean other text")
    refuse_mismatch(message, "Use the tokenizer it was trained with", allow, flag)


def check_finite(path: str, weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN/inf (a diverged run) before anything compares or uses them."""
    bad = nonfinite_tensors(weights.items())
    if bad:
        raise UserError(f"{path} holds NaN/inf weights ({bad[0]}{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}): "
                        "it was written by a run that diverged. Use an earlier checkpoint of that run.")


def _from_hf_folder(path: Path) -> Checkpoint:
    """A Hugging Face folder; MiniMind-V's (``model_type: minimind-v``) with its vision config, and its tower's
    tensors set apart when it was saved with them."""
    raw, weights = read_config_json(path), read_hf_weights(path)  # each file once
    config = config_from_hf(raw, str(path / "config.json"))
    tokenizer = str(path) if (path / "tokenizer.json").exists() else None
    if raw.get("model_type") != MINIMIND_V_TYPE:
        return Checkpoint(str(path), weights, config, tokenizer)
    tower = strip_prefix(weights, TOWER_PREFIX)
    weights = {k: v for k, v in weights.items() if not k.startswith(TOWER_PREFIX)}
    vision = hf_vision_config(raw, weights, str(path / "config.json"))
    return Checkpoint(str(path), weights, config, tokenizer, vision_config=vision, tower_weights=tower or None)


def _from_raw(path: Path, raw: Any) -> Checkpoint:
    """A checkpoint from a loaded ``.ckpt`` / ``.pth``: stage checkpoint, adapter file or bare state dict."""
    tokenizer = (raw.get("hyper_parameters") or {}).get("tokenizer") if isinstance(raw, dict) else None
    if is_adapter(raw):
        adapter = adapter_from_raw(raw, path)
        base = open_checkpoint(resolve_base(adapter, path))
        if base.adapter is not None:
            raise UserError(f"the base {base.path} of the LoRA adapter {path} is itself an adapter")
        return Checkpoint(str(path), base.weights, base.model_config or adapter.model_config,
                          tokenizer or base.tokenizer_dir, adapter, str(path), raw.get("stage"),
                          raw.get("tokenizer_fingerprint") or base.tokenizer_fingerprint)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        weights = strip_prefix(raw["state_dict"], STAGE_PREFIX)
        if not weights:
            raise UserError(f"{path} holds no transformer weights (no keys starting with '{STAGE_PREFIX}')")
        return Checkpoint(str(path), weights, raw.get("model_config"), tokenizer, stage=raw.get("stage"),
                          tokenizer_fingerprint=raw.get("tokenizer_fingerprint"),
                          vision_config=raw.get("vision_config"), vision_encoder=raw.get("vision_encoder"),
                          vision_encoder_fingerprint=raw.get("vision_encoder_fingerprint"))
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return Checkpoint(str(path), raw)
    raise UserError(f"{path} is neither a Lightning checkpoint, a MiniMind state dict nor a LoRA adapter file")


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | Path, preset: Optional[str] = None, device: str = "auto",
               lora: Optional[str | Path] = None, vision_encoder: Optional[str | Path] = None) -> MiniMindForCausalLM:
    """The transformer of any supported checkpoint, in eval mode, on ``device``; a MiniMind-V checkpoint gives a
    ``MiniMindVLM`` (``forward(input_ids, pixel_values=...)``).

    Args:
        path: A Lightning ``.ckpt`` of any stage (a LoRA checkpoint loads its recorded base plus its
            adapters), a MiniMind ``.pth`` or a Hugging Face folder (ours, MiniMind's or MiniMind-V's).
        preset: Model preset of a ``.pth``, which stores no config (default: read off the tensor shapes).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        lora: An adapter file to put on top, unmerged.
        vision_encoder: The vision tower folder (Hugging Face SigLIP / SigLIP2 / CLIP: config.json, weights,
            preprocessor_config.json) of a MiniMind-V checkpoint, e.g. ``siglip2-base-p32-256-ve``; default: the
            one its stage checkpoint recorded, else (a MiniMind-V transformers folder saved with its
            ``vision_encoder.*`` tensors) the folder's own tower, whose config is read off its tensor shapes
            (``vision.tower.tower_from_weights``); with none, the model reads text only and refuses images.
    """
    return open_checkpoint(path, lora).build_model(preset, device=device, vision_encoder=vision_encoder)


def load_tokenizer(path: str | Path, tokenizer: Optional[str] = None, allow_mismatch: bool = False) -> Tokenizer:
    """``tokenizer`` if given, else the one recorded with the checkpoint at ``path``; either must be the tokenizer
    the model was trained with, where the checkpoint records it (``allow_mismatch``: only warn)."""
    return open_checkpoint(path).tokenizer(tokenizer, allow_mismatch)
