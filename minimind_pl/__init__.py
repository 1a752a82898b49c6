"""minimind_pl: MiniMind, a tiny ChatGPT-style model, trained end to end on PyTorch Lightning.

The public API::

    from minimind_pl import ModelConfig, MiniMindForCausalLM, Tokenizer, load_model

- :class:`ModelConfig`: the architecture (MiniMind's field names; ``ModelConfig.from_preset("minimind-3")``);
- :class:`MiniMindForCausalLM`: the transformer, a plain ``torch.nn.Module``;
- :class:`Tokenizer`: tokenizer folders, the chat template (``encode_chat``), streaming decode;
- :func:`load_model`: the transformer of any checkpoint (any stage's ``.ckpt``, a MiniMind ``.pth`` or a
  Hugging Face folder), in eval mode; ``lora=`` adds an adapter file; a MiniMind-V checkpoint gives a
  vision-language model whose tower is ``vision_encoder=DIR`` (``forward(input_ids, pixel_values=...)``).

Generation is :func:`minimind_pl.generation.generate` with :class:`~minimind_pl.generation.SamplingSettings`.
"""


from __future__ import annotations

from typing import TYPE_CHECKING

from minimind_pl.lazy import lazy_exports

if TYPE_CHECKING:
    from minimind_pl.checkpoints import load_model
    from minimind_pl.config import ModelConfig
    from minimind_pl.model import MiniMindForCausalLM
    from minimind_pl.tokenizer import Tokenizer

__all__ = ["ModelConfig", "MiniMindForCausalLM", "Tokenizer", "load_model"]

#: Where each public name is defined. They are imported on first use, so that importing a submodule (the
#: command line: ``python main.py --help``) does not pay for torch.
_PUBLIC = {"ModelConfig": "minimind_pl.config", "MiniMindForCausalLM": "minimind_pl.model",
           "Tokenizer": "minimind_pl.tokenizer", "load_model": "minimind_pl.checkpoints"}


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
