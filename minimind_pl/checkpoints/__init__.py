"""Every weight format in one place, both directions; each file is read once.

- :mod:`~minimind_pl.checkpoints.loading`: :func:`open_checkpoint` / :func:`load_model` for any supported
  file (Lightning ``.ckpt`` of any stage, LoRA adapters, MiniMind ``.pth``, Hugging Face folder);
- :mod:`~minimind_pl.checkpoints.huggingface`: write and read Hugging Face (Qwen3) folders;
- :mod:`~minimind_pl.checkpoints.minimind`: MiniMind ``.pth`` files and configs read off tensor shapes;
- :mod:`~minimind_pl.checkpoints.adapters`: LoRA adapter files;
- :mod:`~minimind_pl.checkpoints.files`: the one safe ``torch.load`` and the names weights sit under.
"""

from minimind_pl.checkpoints.adapters import LoRAFile, apply_lora_file, read_lora_file, save_lora
from minimind_pl.checkpoints.files import STAGE_PREFIX, read_torch_file
from minimind_pl.checkpoints.huggingface import config_from_hf, load_hf_directory, save_hf_directory
from minimind_pl.checkpoints.loading import Checkpoint, load_model, load_tokenizer, open_checkpoint, pick_device
from minimind_pl.checkpoints.minimind import infer_config, save_minimind

__all__ = [
    "Checkpoint", "LoRAFile", "STAGE_PREFIX", "apply_lora_file", "config_from_hf", "infer_config", "load_hf_directory",
    "load_model", "load_tokenizer", "open_checkpoint", "pick_device", "read_lora_file", "read_torch_file",
    "save_hf_directory", "save_lora", "save_minimind",
]
