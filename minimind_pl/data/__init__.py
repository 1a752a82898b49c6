"""Data: one LightningDataModule per jsonl format, over a shared token cache, packing and a resumable loader.

- :class:`PretrainDataModule`: ``{"text": ...}`` lines.
- :class:`SFTDataModule`: ``{"conversations": [...]}`` lines (MiniMind's chat format).
- :class:`DPODataModule`: ``{"chosen": [...], "rejected": [...]}`` preference pairs.
- :class:`PromptDataModule`: prompts for the RL stages (MiniMind's ``rlaif.jsonl`` or ``{"prompt": ...}``).
- :class:`VLMDataModule`: conversations about images (MiniMind-V): jsonl + image files, or MiniMind-V's Parquet.
- :class:`ImageCaptionDataModule`: (image, caption) pairs from VLM jsonl files, for the SigLIP stage.
- :class:`JsonlDataModule`: their shared base (cache, packing, validation split, loaders) and the hooks
  a new format overrides (:mod:`minimind_pl.data.base` says how: an encoder and ``make_encoder``).

What a format is (its fields, record check, texts and encoder) lives in :mod:`minimind_pl.data.formats`, which
does not import Lightning; nor do the token cache, the block map, the jsonl parser, packing and the loader. The
names below are imported on first use (PEP 562), so ``import minimind_pl.data.formats`` or ``minimind_pl.data.cache``
(the data tools, ``eval``, tokenizer training) does not load Lightning (about 5 s); ``minimind_pl.data.SFTDataModule``
(configs' ``class_path``) still works.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "JsonlDataModule": "base",
    "DataFormatError": "cache", "RecordEncoder": "cache", "TokenCache": "cache", "ensure_cache": "cache",
    "DPODataModule": "dpo", "pair_loader": "dpo", "DPOEncoder": "formats.dpo",
    "ResumableDataLoader": "loader", "ResumableSampler": "loader",
    "DocumentStream": "packing", "PackedDataset": "packing", "PaddedDataset": "packing", "collate": "packing",
    "PretrainDataModule": "pretrain", "PretrainEncoder": "formats.pretrain",
    "PromptDataModule": "prompts", "PromptEncoder": "formats.prompts",
    "SFTDataModule": "sft", "SFTEncoder": "formats.sft", "SYSTEM_PROMPTS": "formats.sft",
    "assistant_mask": "formats.sft",
    "VLMDataModule": "vlm", "VisionSFTEncoder": "formats.vlm", "ImageRows": "image_rows",
    "collate_images": "image_rows", "ImageCaptionDataModule": "image_captions",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()})
