"""Training stages: one LightningModule each, all on ``Stage``."""

from minimind_pl.stages.base import Stage
from minimind_pl.stages.distill import Distill
from minimind_pl.stages.dpo import DPO
from minimind_pl.stages.grpo import GRPO
from minimind_pl.stages.lora import LoRA
from minimind_pl.stages.ppo import PPO
from minimind_pl.stages.pretrain import SFT, Pretrain
from minimind_pl.stages.siglip import SigLIP
from minimind_pl.stages.vision_language import VLMSFT, VLMPretrain

__all__ = ["Stage", "Pretrain", "SFT", "LoRA", "Distill", "DPO", "GRPO", "PPO", "SigLIP", "VLMPretrain", "VLMSFT"]
