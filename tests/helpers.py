"""Builders shared by several test files (``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from minimind_pl.cli import run_lightning
from minimind_pl.config import ModelConfig
from minimind_pl.generation import generate
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.rewards import Reward
from minimind_pl.tokenizer import Tokenizer


def require(available: bool, what: str) -> None:
    """Skip the calling test when ``what`` is missing; under CI (``CI`` set, as ``.ci/run`` runs) fail instead.

    A skipped test looks green, so CI must never skip for lack of the shared data, a browser or a test extra.
    """
    if available:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run every test, but {what}", pytrace=False)
    pytest.skip(what)


def require_module(name: str) -> ModuleType:
    """Import ``name`` (a test extra such as ``transformers``), or ``require`` it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        require(False, f"{name} is not installed ({err}); pip install -e '.[dev]'")
        raise  # not reached: require skipped or failed


def random_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A debug-size model whose every weight is random (norm weights around one), in eval mode."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_preset("debug", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def random_adapted_model(lora_config, seed: int = 0) -> MiniMindForCausalLM:
    """``random_model(seed)`` with LoRA adapters whose B matrices are non-zero (so they change the output)."""
    from minimind_pl.lora import apply_lora

    model = random_model(seed)
    apply_lora(model, lora_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.05)
    return model


def minimind_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random fp16 state dict in the format of MiniMind's `out/*.pth` files, built from the
    documented key names (tied: `lm_head.weight` and `model.embed_tokens.weight` both present)."""
    g = torch.Generator().manual_seed(seed)
    c, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, c), "model.norm.weight": (c,)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (config.num_attention_heads * d, c),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, c),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, c),
            p + "self_attn.o_proj.weight": (c, config.num_attention_heads * d),
            p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
        })
        if config.qk_norm:  # MiniMind2's files have none
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        mlps = {p + "mlp.": i}
        if config.use_moe:
            shapes[p + "mlp.gate.weight"] = (config.num_experts, c)
            mlps = {p + f"mlp.experts.{e}.": config.moe_intermediate_size for e in range(config.num_experts)}
            mlps.update({p + f"mlp.shared_experts.{e}.": i for e in range(config.n_shared_experts)})
        for m, width in mlps.items():
            shapes.update({m + "gate_proj.weight": (width, c), m + "up_proj.weight": (width, c),
                           m + "down_proj.weight": (c, width)})
    sd = {k: (0.05 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def write_stage_checkpoint(model: MiniMindForCausalLM, path: Path, tokenizer_dir: Path, stage: str = "Pretrain") -> Path:
    """A file in the layout a Stage checkpoint has (weights under ``model.``, config, linked tokenizer, stage)."""
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "stage": stage,
                "hyper_parameters": {"tokenizer": str(tokenizer_dir)}}, path)
    return path


def with_yarn(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """The same weights with YaRN RoPE scaling on (what ``--inference_rope_scaling true`` builds)."""
    scaled = MiniMindForCausalLM(dataclasses.replace(model.config, inference_rope_scaling=True))
    scaled.load_state_dict(model.state_dict())
    return scaled.eval()


def greedy_chat_answer(model: MiniMindForCausalLM, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """What ``chat --temperature 0`` should print for one user ``prompt``: plain greedy generation, decoded."""
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True))
    return tokenizer.decode(generate(model, [ids], max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_id)[0])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a forward pass without gradients."""
    with torch.no_grad():
        return model(ids).logits.float()


def packed_batch(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row holding ``docs`` back to back, laid out as ``PackedDataset`` makes it.

    ``doc_ids`` count the documents along the row, ``position_ids`` restart at 0 in each, and a document's
    last token has label -100 (its target would lie in the next document).
    """
    labels = [torch.cat([d[1:], torch.tensor([-100])]) for d in docs]
    return {"input_ids": torch.cat(docs)[None], "labels": torch.cat(labels)[None],
            "doc_ids": torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None],
            "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None],
            "real_tokens": torch.tensor(sum(len(d) for d in docs))}


def random_documents(lengths: list[int], vocab_size: int = 6400, seed: int = 0) -> list[torch.Tensor]:
    """Documents of random token ids (above the special tokens) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g) for n in lengths]


def with_weights(stage, model: MiniMindForCausalLM):
    """``stage`` with ``model``'s weights copied into its transformer, in eval mode (no dropout, no router loss)."""
    stage.model.load_state_dict(model.state_dict())
    return stage.eval()


REPO = Path(__file__).resolve().parents[1]  # the checkout
TINY_MODEL = [
    "--model.config.hidden_size", "64", "--model.config.num_hidden_layers", "2",
    "--model.config.num_attention_heads", "4", "--model.config.num_key_value_heads", "2",
    "--model.config.max_position_embeddings", "256", "--model.config.vocab_size", "6400",
]


def tiny_run(tmp_path: Path, shared_dir: Path, stage: str, data: str, max_steps: int, extra=(),
             keep_checkpoints: bool = False) -> list[str]:
    """Arguments of a tiny CPU fit on a shared corpus file, writing everything under ``tmp_path``; a checkpoint
    every 2 steps (only the newest and ``last.ckpt`` stay, unless ``keep_checkpoints``)."""
    config = REPO / "configs" / "minimind3" / f"{stage}.yaml"
    keep = ', "save_top_k": -1' if keep_checkpoints else ""
    callbacks = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                 f'{{"dirpath": "{tmp_path / "ckpt"}", "save_last": true, "every_n_train_steps": 2{keep}}}}}]')
    return ["fit", "--config", str(config), *TINY_MODEL,
            "--model.init_weights", "null", "--model.learning_rate", "3e-3",
            "--data.train_path", str(shared_dir / "corpus" / data), "--data.val_path", "null",
            "--data.val_fraction", "0.05", "--data.tokenizer", str(shared_dir / "minimind"),
            "--data.seq_len", "64", "--data.batch_size", "4", "--data.num_workers", "0",
            "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "1",
            "--trainer.accumulate_grad_batches", "1", "--trainer.max_epochs", "100",
            "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps", "2",
            "--trainer.val_check_interval", str(max_steps), "--trainer.limit_val_batches", "2",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.callbacks", callbacks, *extra]


class RecordBatches(Callback):
    """Remember a fingerprint of every training batch, in order; optionally stop the run early."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[int] = []
        self.stop_after = stop_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(int(batch["input_ids"].sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_after is not None and trainer.global_step >= self.stop_after:
            trainer.should_stop = True  # an interruption: the run ends after its step-4 checkpoint


def fit(args: list[str], recorder: RecordBatches):
    """Run a training command with a batch recorder beside the configured callbacks."""
    return run_lightning(args, extra_callbacks=[recorder])


def run_python(args: list[str], prefix: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <args>`` in a fresh process at the repository root (so this checkout's package is imported),
    behind an optional command ``prefix`` (see ``read_only_mount`` and ``without_root_override``)."""
    return subprocess.run([*prefix, sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def read_only_mount(folder: Path) -> list[str]:
    """A command prefix that runs a command with ``folder`` mounted read-only (a private mount namespace, so
    nothing changes outside it): writes there fail with EROFS even for root. Skips where the system forbids it."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    prefix = ["unshare", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]
    if not shutil.which("unshare") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("cannot mount a folder read-only here (unshare --map-root-user --mount is not permitted)")
    return prefix


def without_root_override() -> list[str]:
    """A command prefix under which file permissions apply: nothing for an ordinary user; for root, setpriv
    dropping the capabilities that let root read and write past them. Skips where that is not possible."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    return prefix


class CJKShare(Reward):
    """A reward any policy can learn fast: the share of an answer's characters that are CJK ideographs (a random
    model writes some; a policy that writes more scores more)."""

    name = "cjk"

    def score(self, samples):
        return [sum("\u4e00" <= ch <= "\u9fff" for ch in s.completion) / max(len(s.completion), 1) for s in samples]


class SaveRankWeights(Callback):
    """At the end of training, every rank saves its transformer's weights to ``<dirpath>/rank<N>.pt`` (to check that
    the ranks of a DDP run stayed in step)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.model.state_dict(), self.dirpath / f"rank{trainer.global_rank}.pt")


def record_tokenizer_reads(monkeypatch) -> list[str]:
    """From now on, note the module that calls ``Tokenizer.from_file`` for each tokenizer folder read; the list."""
    readers: list[str] = []
    read = Tokenizer.from_file.__func__

    def from_file(cls, path):
        readers.append(sys._getframe(1).f_globals["__name__"])
        return read(cls, path)

    monkeypatch.setattr(Tokenizer, "from_file", classmethod(from_file))
    return readers


def training_side(readers: list[str]) -> list[str]:
    """The reads of ``record_tokenizer_reads`` outside the data modules (a DataModule reads its own: no stage is built
    when it is)."""
    return [name for name in readers if not name.startswith("minimind_pl.data")]


# Image processor settings of the tiny towers (the real folders' values: SigLIP 0.5/0.5, CLIP's own mean/std)
TOWER_PREPROCESSORS = {
    "siglip": {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor"},
    "clip": {"do_resize": True, "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "CLIPImageProcessor"},
}


def tiny_tower_folder(folder: Path, family: str = "siglip", whole_model: bool = False, seed: int = 0,
                      hidden_size: int = 32) -> Path:
    """A random transformers SigLIP / CLIP vision tower saved with ``save_pretrained`` (32×32 images, 8×8 patches:
    16 patch features of width ``hidden_size``) plus its preprocessor_config.json. ``whole_model``: the whole
    SiglipModel / CLIPModel (text side too), as openai/clip-vit-base-patch16 is."""
    import json

    transformers = require_module("transformers")
    torch.manual_seed(seed)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size + 8, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=99, max_position_embeddings=16)
    if family == "siglip":
        model = (transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
                 if whole_model else transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)))
    else:
        model = (transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text))
                 if whole_model else transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)))
    with torch.no_grad():  # norms away from their init, so a missed LayerNorm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(TOWER_PREPROCESSORS[family]), encoding="utf-8")
    return Path(folder)
