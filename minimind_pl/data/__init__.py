"""Data: one LightningDataModule per jsonl format, over a shared token cache, packing and a resumable loader.

- :class:`PretrainDataModule`: ``{"text": ...}`` lines.
- :class:`SFTDataModule`: ``{"conversations": [...]}`` lines (MiniMind's chat format).
- :class:`DPODataModule`: ``{"chosen": [...], "rejected": [...]}`` preference pairs.
- :class:`PromptDataModule`: prompts for the RL stages (MiniMind's ``rlaif.jsonl`` or ``{"prompt": ...}``).
- :class:`JsonlDataModule`: their shared base (cache, packing, validation split, loaders) and the hooks
  a new format overrides (:mod:`minimind_pl.data.base` says how: an encoder and ``make_encoder``).
"""
from .base import JsonlDataModule
from .cache import DataFormatError, RecordEncoder, TokenCache, ensure_cache
from .dpo import DPODataModule, DPOEncoder, pair_loader
from .loader import ResumableDataLoader, ResumableSampler
from .packing import DocumentStream, PackedDataset, PaddedDataset, collate
from .pretrain import PretrainDataModule, PretrainEncoder
from .prompts import PromptDataModule, PromptEncoder
from .sft import SYSTEM_PROMPTS, SFTDataModule, SFTEncoder, assistant_mask

__all__ = [
    "DataFormatError", "DocumentStream", "JsonlDataModule", "PackedDataset", "PaddedDataset",
    "PretrainDataModule", "PretrainEncoder", "RecordEncoder", "ResumableDataLoader", "ResumableSampler",
    "SFTDataModule", "SFTEncoder", "SYSTEM_PROMPTS", "TokenCache", "assistant_mask", "collate",
    "ensure_cache", "DPODataModule", "DPOEncoder", "pair_loader", "PromptDataModule", "PromptEncoder",
]
