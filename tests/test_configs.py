"""The shipped configs: every YAML under configs/ parses, and each stage file derives from its preset's base.yaml.

``python main.py fit --config configs/<preset>/<stage>.yaml`` runs as ``--config configs/<preset>/base.yaml
--config configs/<preset>/<stage>.yaml`` (``minimind_pl.cli.with_base_configs``). These tests pin what the
effective configuration of each stage is, and that a stage config trains with the shared settings applied.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest
import yaml

from minimind_pl.cli import BASE_CONFIG, main, with_base_configs

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "configs"
ALL_YAML = sorted(CONFIG_ROOT.rglob("*.yaml"))
MODEL_CONFIGS = [p for p in ALL_YAML if p.name == "model.yaml"]  # nested model configs (`config: model.yaml`)
BASE_CONFIGS = [p for p in ALL_YAML if p.name == BASE_CONFIG]     # a preset's shared settings
STAGE_CONFIGS = [p for p in ALL_YAML if p not in MODEL_CONFIGS and p not in BASE_CONFIGS]

STAGE_CLASSES = {"pretrain": "Pretrain", "sft": "SFT", "lora": "LoRA", "dpo": "DPO", "distill": "Distill",
                 "reason": "SFT", "grpo": "GRPO", "ppo": "PPO", "siglip": "SigLIP",
                 "vlm_pretrain": "VLMPretrain", "vlm_sft": "VLMSFT"}
#: Stages whose file stem means another class in a preset (minimind3v: MiniMind-V's two stages).
PRESET_STAGE_CLASSES = {"minimind3v": {"pretrain": "VLMPretrain", "sft": "VLMSFT"}}
# where the DataModules live (SigLIP's image-caption pairs sit beside its stage until the image data formats take them)
DATA_MODULES = ("minimind_pl.data.",)
RL_STAGES = ("grpo", "ppo")  # manual optimisation: the stage clips, the Trainer must not
# What each preset's stages share, as the effective config shows it; {stage} is the file's stem.
PRESETS = {
    "minimind3": {"precision": "bf16-mixed", "save_dir": "checkpoints", "name": "minimind3/{stage}",
                  "dirpath": "checkpoints/minimind3/{stage}"},
    "minimind3v": {"precision": "bf16-mixed", "save_dir": "checkpoints", "name": "minimind3v/{stage}",
                   "dirpath": "checkpoints/minimind3v/{stage}"},
    "demo": {"precision": None, "save_dir": "checkpoints/demo", "name": "{stage}",
             "dirpath": "checkpoints/demo/{stage}"},
}
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def stage_class(path: Path) -> str:
    """The stage class a shipped stage config trains (by its preset and file stem)."""
    return PRESET_STAGE_CLASSES.get(path.parent.name, {}).get(path.stem) or STAGE_CLASSES[path.stem]


def ids(path: Path) -> str:
    return str(path.relative_to(REPO))


def print_config(args: list[str], capsys) -> dict:
    """The effective configuration of ``python main.py <args> --print_config``, as a dict."""
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def merged(base, top):
    """``top`` over ``base`` the way jsonargparse merges a later config: mappings key by key, lists of the same
    length entry by entry, anything else replaced."""
    if isinstance(base, dict) and isinstance(top, dict):
        return {**base, **{k: merged(base[k], v) if k in base else v for k, v in top.items()}}
    if isinstance(base, list) and isinstance(top, list) and len(base) == len(top):
        return [merged(b, t) for b, t in zip(base, top)]
    return top


def assert_contains(effective, expected, where: str = "") -> None:
    """Every value of ``expected`` is in ``effective`` (which also holds all the defaults)."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert key in effective, f"{where}.{key} missing"
            assert_contains(effective[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(effective) == len(expected), where
        for n, (e, x) in enumerate(zip(effective, expected)):
            assert_contains(e, x, f"{where}[{n}]")
    else:
        assert effective == expected, f"{where}: {effective!r} != {expected!r}"


def test_every_yaml_is_a_stage_base_or_model_config():
    assert STAGE_CONFIGS and BASE_CONFIGS and MODEL_CONFIGS
    for path in STAGE_CONFIGS:
        assert path.parent.name in PRESETS and path.stem in STAGE_CLASSES, f"untested config kind: {ids(path)}"
        assert (path.parent / BASE_CONFIG).is_file(), f"{ids(path)} has no {BASE_CONFIG} beside it"
    for path in BASE_CONFIGS:
        assert set(read(path)) <= {"seed_everything", "trainer"}, f"{ids(path)} holds more than shared settings"


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=ids)
def test_every_stage_config_has_its_effective_values(config, capsys):
    preset, stage = config.parent.name, config.stem
    expected = {k: v.format(stage=stage) if isinstance(v, str) else v for k, v in PRESETS[preset].items()}
    cfg = print_config(["fit", "--config", str(config)], capsys)
    trainer = cfg["trainer"]
    assert cfg["model"]["class_path"] == f"minimind_pl.stages.{stage_class(config)}"
    assert cfg["data"]["class_path"].startswith(DATA_MODULES)
    assert cfg["seed_everything"] == 42
    assert trainer["precision"] == expected["precision"]
    assert trainer["gradient_clip_val"] == (None if stage in RL_STAGES else 1.0)
    assert trainer["logger"]["class_path"] == TENSORBOARD
    assert trainer["logger"]["init_args"]["save_dir"] == expected["save_dir"]
    assert trainer["logger"]["init_args"]["name"] == expected["name"]
    [checkpoint] = trainer["callbacks"]
    assert checkpoint["class_path"] == MODEL_CHECKPOINT
    assert checkpoint["init_args"]["dirpath"] == expected["dirpath"]
    assert checkpoint["init_args"]["save_last"] is True
    # and exactly base.yaml with the stage file on top
    shared = merged(read(config.parent / BASE_CONFIG), {k: v for k, v in read(config).items()
                                                         if k in ("seed_everything", "trainer")})
    assert_contains(cfg, shared)


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=ids)
def test_stage_configs_state_only_what_differs_from_their_base(config):
    shared, own = read(config.parent / BASE_CONFIG)["trainer"], read(config).get("trainer", {})
    assert "seed_everything" not in read(config)
    for key, value in own.items():
        if not isinstance(value, (dict, list)):
            assert shared.get(key) != value, f"{ids(config)} repeats trainer.{key}: {value} of {BASE_CONFIG}"
    assert "class_path" not in own.get("logger", {}), "the logger class is set once, in base.yaml"
    for entry in own.get("callbacks", []):
        assert "class_path" not in entry, "the checkpoint callback class is set once, in base.yaml"


def signature_defaults(cls: type) -> dict:
    """The default of every ``__init__`` argument of ``cls``, as jsonargparse resolves them: a subclass's own
    default wins over its bases' (the stages and DataModules pass ``**kwargs`` up)."""
    found: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            found.update({name: p.default for name, p in inspect.signature(init).parameters.items()
                          if p.default is not inspect.Parameter.empty})
    return found


def class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def same_value(written, default) -> bool:
    """Whether a YAML value is the default itself (a list as the default tuple; 1 is not True, 3.0e-7 is 3e-7)."""
    if isinstance(written, bool) or isinstance(default, bool):
        return written is default
    if isinstance(written, (int, float)) and isinstance(default, (int, float)):
        return float(written) == float(default)
    if isinstance(written, (list, tuple)) and isinstance(default, (list, tuple)):
        return len(written) == len(default) and all(same_value(w, d) for w, d in zip(written, default))
    return type(written) is type(default) and written == default


def restated(written: dict, defaults: dict, where: str, classes: dict | None = None) -> list[str]:
    """``where.key: value`` for each value of ``written`` equal to its default, looking into the ``init_args`` of
    every class the values name (rewards, loggers, callbacks) and into a nested ``config`` (ModelConfig).
    ``classes`` names the class of entries written without ``class_path`` (they complete base.yaml's)."""
    from minimind_pl.config import ModelConfig

    found = []
    for key, value in written.items():
        at = f"{where}.{key}"
        if key == "config" and isinstance(value, dict):
            found += restated(value, signature_defaults(ModelConfig), at)
        elif isinstance(value, dict) and ("class_path" in value or at in (classes or {})):
            cls = class_of(value.get("class_path") or classes[at])
            found += restated(value.get("init_args") or {}, signature_defaults(cls), f"{at}.init_args")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for n, entry in enumerate(value):
                found += restated({f"{key}[{n}]": entry}, {}, where, classes)
        elif key in defaults and same_value(value, defaults[key]):
            found.append(f"{at}: {value!r}")
    return found


def values_given_anyway(path: Path) -> list[str]:
    """What ``path`` sets to the value it would get without it: a stage's or DataModule's signature default, a
    ModelConfig default, Lightning's Trainer/logger/callback default or, in a stage file, its base.yaml's value."""
    from lightning.pytorch import Trainer

    from minimind_pl.config import ModelConfig

    own = read(path)
    if path in MODEL_CONFIGS:
        return restated(own, signature_defaults(ModelConfig), path.name)
    base = {} if path in BASE_CONFIGS else read(path.parent / BASE_CONFIG)
    trainer_base = base.get("trainer", {})
    found = restated({k: v for k, v in own.get("trainer", {}).items() if k not in ("logger", "callbacks")},
                     {**signature_defaults(Trainer), **trainer_base}, "trainer")
    logger, callbacks = own.get("trainer", {}).get("logger"), own.get("trainer", {}).get("callbacks", [])
    for at, entry, inherited in [("trainer.logger", logger, trainer_base.get("logger")),
                                 *[(f"trainer.callbacks[{n}]", c, (trainer_base.get("callbacks") or [{}] * (n + 1))[n])
                                   for n, c in enumerate(callbacks)]]:
        if entry:
            inherited = inherited or {}
            cls = class_of(entry.get("class_path") or inherited["class_path"])
            found += restated(entry.get("init_args") or {},
                              {**signature_defaults(cls), **(inherited.get("init_args") or {})}, f"{at}.init_args")
    for section in ("model", "data"):
        if section in own:
            cls = class_of(own[section]["class_path"])
            found += restated(own[section].get("init_args") or {}, signature_defaults(cls), f"{section}.init_args")
    return found


@pytest.mark.parametrize("config", ALL_YAML, ids=ids)
def test_configs_hold_only_values_that_differ_from_what_they_would_get_anyway(config):
    """A value equal to its default is a second source for it: the default's change would not reach this preset.
    A recipe value lives in the stage's signature (documented there with MiniMind's value) or, where the preset
    differs, in the YAML with a comment that says whose value it is."""
    assert values_given_anyway(config) == [], f"{ids(config)} restates defaults"


def test_the_default_check_flags_a_restated_value(tmp_path):
    config = tmp_path / "minimind3" / "grpo.yaml"
    config.parent.mkdir()
    (config.parent / BASE_CONFIG).write_text((CONFIG_ROOT / "minimind3" / BASE_CONFIG).read_text(encoding="utf-8"))
    config.write_text(yaml.safe_dump({
        "trainer": {"log_every_n_steps": 100, "max_epochs": 1, "callbacks": [{"init_args": {"save_last": True}}]},
        "model": {"class_path": "minimind_pl.stages.GRPO",
                  "init_args": {"learning_rate": 3.0e-7, "betas": [0.9, 0.95], "num_generations": 8,
                                "config": {"hidden_size": 768, "num_hidden_layers": 4},
                                "rewards": [{"class_path": "minimind_pl.rewards.RewardModel",
                                             "init_args": {"path": "rm", "clip": 3.0}}]}},
        "data": {"class_path": "minimind_pl.data.PromptDataModule",
                 "init_args": {"train_path": "x.jsonl", "seq_len": 64, "batch_size": 3, "num_workers": 1}}}))
    assert sorted(values_given_anyway(config)) == sorted([
        "trainer.log_every_n_steps: 100", "trainer.callbacks[0].init_args.save_last: True",
        "model.init_args.learning_rate: 3e-07", "model.init_args.betas: [0.9, 0.95]",
        "model.init_args.config.hidden_size: 768", "model.init_args.rewards[0].init_args.clip: 3.0",
        "data.init_args.num_workers: 1"])


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=ids)
def test_every_base_config_parses_alone(config, capsys):
    cfg = print_config(["fit", "--config", str(config)], capsys)
    assert_contains(cfg, read(config))


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=ids)
def test_every_shared_model_config_is_a_valid_model_config(config):
    from minimind_pl.config import ModelConfig

    assert ModelConfig.from_dict(read(config)).num_parameters()[0] > 0
    users = [p for p in STAGE_CONFIGS if p.parent == config.parent and "config: model.yaml" in p.read_text()]
    assert users, f"{ids(config)} is used by no stage config"


def test_base_config_goes_first_once_per_folder(tmp_path):
    stage, other, base = (str(CONFIG_ROOT / "demo" / n) for n in ("sft.yaml", "lora.yaml", BASE_CONFIG))
    assert with_base_configs(["fit", "--config", stage, "--trainer.max_epochs", "1"]) == [
        "fit", "--config", base, "--config", stage, "--trainer.max_epochs", "1"]
    assert with_base_configs(["fit", f"--config={stage}"]) == ["fit", "--config", base, f"--config={stage}"]
    assert with_base_configs(["fit", "-c", stage, "--config", other]) == [
        "fit", "--config", base, "-c", stage, "--config", other]
    assert with_base_configs(["fit", "--config", base, "--config", stage]) == ["fit", "--config", base,
                                                                               "--config", stage]
    elsewhere = tmp_path / "sft.yaml"
    elsewhere.write_text("trainer:\n  max_epochs: 1\n")
    for args in (["fit", "--config", str(elsewhere)], ["fit", "--config", '{"trainer": {"max_epochs": 1}}'],
                 ["fit", "--config", "x" * 5000], ["fit", "--trainer.max_epochs", "1"]):
        assert with_base_configs(args) == args


def test_command_line_overrides_win_over_base_and_stage(capsys):
    config = str(CONFIG_ROOT / "minimind3" / "pretrain.yaml")
    cfg = print_config(["fit", "--config", config, "--trainer.max_epochs", "3",
                        "--model.init_args.learning_rate", "1e-4", "--data.init_args.batch_size", "2",
                        "--trainer.logger.init_args.save_dir", "elsewhere", "--trainer.log_every_n_steps", "7",
                        "--ckpt_path", "checkpoints/minimind3/pretrain/last.ckpt"], capsys)
    trainer = cfg["trainer"]
    assert (trainer["max_epochs"], trainer["log_every_n_steps"]) == (3, 7)
    assert cfg["model"]["init_args"]["learning_rate"] == 1e-4
    assert cfg["data"]["init_args"]["batch_size"] == 2
    assert cfg["ckpt_path"] == "checkpoints/minimind3/pretrain/last.ckpt"
    assert (trainer["logger"]["init_args"]["save_dir"], trainer["logger"]["init_args"]["name"]) == (
        "elsewhere", "minimind3/pretrain")
    # the rest still comes from base.yaml and pretrain.yaml
    assert (trainer["precision"], trainer["val_check_interval"], cfg["data"]["init_args"]["seq_len"]) == (
        "bf16-mixed", 4000, 1024)
    assert trainer["callbacks"][0]["init_args"]["dirpath"] == "checkpoints/minimind3/pretrain"
    assert trainer["callbacks"][0]["init_args"]["every_n_train_steps"] == 1000


STAGE_DATA = {"pretrain": "pretrain_real.jsonl", "sft": "sft_real.jsonl", "lora": "sft_real.jsonl",
              "reason": "sft_real.jsonl", "distill": "sft_real.jsonl", "dpo": "dpo_real.jsonl",
              "grpo": "prompts.jsonl", "ppo": "prompts.jsonl", "siglip": "vlm_caption.jsonl",
              "vlm_pretrain": "vlm_caption.jsonl", "vlm_sft": "vlm_sft.jsonl"}
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 1024}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, shared_dir) -> Path:
    """The first 48 lines of each shared corpus file (far fewer batches than any shipped validation interval), RL
    prompts (their first user turns), a 320-token tokenizer for the demo preset (vocab_size 1024) and tiny
    checkpoints to start from."""
    from helpers import random_model, write_stage_checkpoint

    from minimind_pl.data.formats import jsonl_texts
    from minimind_pl.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("small")
    from minimind_pl.demo.vision_world import write_vision_world

    write_vision_world(root, sizes={"caption": 48, "caption_val": 8, "sft": 4, "sft_val": 4})
    for name in {n for n in STAGE_DATA.values() if not n.startswith("vlm_")} - {"prompts.jsonl"}:
        lines = (shared_dir / "corpus" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:48]
        (root / name).write_text("".join(lines), encoding="utf-8")
    conversations = [json.loads(line)["conversations"] for line in (root / "sft_real.jsonl").open(encoding="utf-8")]
    prompts = [{"prompt": next(m["content"] for m in c if m["role"] == "user"), "gt": "1"} for c in conversations]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), "utf-8")
    train_tokenizer(jsonl_texts([root / "pretrain_real.jsonl"]), 320, root / "tokenizer", show_progress=False)
    write_image_conversations(root / "vlm")
    for preset, vocab, tokenizer in (("demo", 1024, root / "tokenizer"), ("minimind3", 6400, shared_dir / "minimind"),
                                     ("minimind3v", 6400, shared_dir / "minimind")):
        write_stage_checkpoint(random_model(vocab_size=vocab, **TINY), root / f"{preset}.ckpt", tokenizer)
    return root


def write_image_conversations(folder: Path) -> Path:
    """16 image conversations (jsonl + PNG files, the VLM DataModule's format) and a tiny SigLIP tower beside them."""
    from PIL import Image

    from helpers import tiny_tower_folder

    folder.mkdir()
    tiny_tower_folder(folder / "tower")
    lines = []
    for n in range(16):
        colour = ("red", "green", "blue")[n % 3]
        Image.new("RGB", (12, 10), colour).save(folder / f"{n}.png")
        lines.append({"conversations": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                        {"role": "assistant", "content": f"It is {colour}."}], "images": [f"{n}.png"]})
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder


class RecordingFastPath:
    """Stands in for ``CompiledTraining`` (compiling takes long on the CPU): records that a stage set up its fast
    path and sent its training forwards through it."""

    made: list["RecordingFastPath"] = []

    def __init__(self, model, flex_attention: bool) -> None:
        self.model, self.forward_calls = model, 0
        RecordingFastPath.made.append(self)

    def forward(self, batch, inputs_embeds=None):
        self.forward_calls += 1
        return self.model(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                          inputs_embeds=inputs_embeds)

    def loss(self, loss_fn):
        return loss_fn


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=ids)
def test_every_stage_config_trains_on_a_small_dataset_as_shipped(config, small_data, shared_dir, tmp_path,
                                                                 monkeypatch):
    """Only the model size, the data (48 lines, rows of 64), the starting weights and the output folders are
    replaced; trainer settings (validation interval, accumulation, precision, clipping) stay as shipped. With
    ``--model.compile true`` every stage trains through its fast path (DPO runs its pairs through the plain model:
    their lengths vary from batch to batch)."""
    monkeypatch.setattr("minimind_pl.stages.base.CompiledTraining", RecordingFastPath)
    RecordingFastPath.made = []
    preset, stage = config.parent.name, config.stem
    tokenizer = small_data / "tokenizer" if preset == "demo" else shared_dir / "minimind"
    data = small_data / (STAGE_DATA[stage] if preset != "minimind3v" else "vlm/train.jsonl")
    args = ["fit", "--config", str(config), *[a for k, v in TINY.items() for a in (f"--model.config.{k}", str(v))],
            "--data.train_path", str(data), "--data.tokenizer", str(tokenizer), "--data.seq_len", "64",
            "--data.batch_size", "2", "--data.num_workers", "0",
            *(["--data.cache_dir", str(tmp_path / "cache")] if stage != "siglip" else []),  # images: no token cache
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--model.compile", "true",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.callbacks", json.dumps([{"init_args": {"dirpath": str(tmp_path / "ckpt")}}])]
    shipped = read(config)["model"]["init_args"]
    if preset == "demo":
        args += ["--data.val_path", str(data)]
    if preset == "minimind3v" or stage.startswith("vlm_"):  # a tiny tower: 16 features per image
        tower = str(small_data / "vlm" / "tower")
        args += ["--model.vision_encoder", tower, "--data.vision_encoder", tower, "--data.image_token_len", "16"]
    if stage == "siglip":  # the trained tower's folder
        args += ["--model.tower_folder", str(tmp_path / "tower")]
    if stage in RL_STAGES:  # short answers, and no reward model to download
        args += ["--model.max_new_tokens", "8", "--model.rewards", '[{"class_path": "minimind_pl.rewards.LengthShaping"}]']
    for key in ("init_weights", "teacher"):
        if shipped.get(key):
            args += [f"--model.{key}", str(small_data / f"{preset}.ckpt")]
    effective = merged(read(config.parent / BASE_CONFIG), read(config))["trainer"]
    cli = main(args)
    trainer = cli.trainer
    assert trainer.global_step == 2
    assert trainer.num_training_batches < 200  # fewer batches than minimind3's validation interval
    assert trainer.val_check_interval == effective.get("val_check_interval", 1.0)
    assert trainer.accumulate_grad_batches == effective.get("accumulate_grad_batches", 1)
    assert trainer.gradient_clip_val == (None if stage in RL_STAGES else 1.0)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert (tmp_path / "tower" / "model.safetensors").is_file() == (stage == "siglip")
    assert len(RecordingFastPath.made) == 1 and cli.model.compiled is None  # set up for fit, dropped after it
    plain = ("dpo", *RL_STAGES, "siglip")  # rows of varying length (pairs, sampled answers) would recompile;
    # SigLIP runs its two towers itself
    assert RecordingFastPath.made[0].forward_calls >= (0 if stage in plain else 2)
