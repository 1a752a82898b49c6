"""The shipped configs: every YAML under configs/ parses, and each stage file derives from its preset's base.yaml.

``python main.py fit --config configs/<preset>/<stage>.yaml`` runs as ``--config configs/<preset>/base.yaml
--config configs/<preset>/<stage>.yaml`` (``minimind_pl.cli.with_base_configs``). These tests pin what the
effective configuration of each stage is, and that a stage config trains with the shared settings applied.
"""

from __future__ import annotations

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
                 "reason": "SFT"}
# What each preset's stages share, as the effective config shows it; {stage} is the file's stem.
PRESETS = {
    "minimind3": {"precision": "bf16-mixed", "save_dir": "checkpoints", "name": "minimind3/{stage}",
                  "dirpath": "checkpoints/minimind3/{stage}"},
    "demo": {"precision": None, "save_dir": "checkpoints/demo", "name": "{stage}",
             "dirpath": "checkpoints/demo/{stage}"},
}
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


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
    assert cfg["model"]["class_path"] == f"minimind_pl.stages.{STAGE_CLASSES[stage]}"
    assert cfg["data"]["class_path"].startswith("minimind_pl.data.")
    assert cfg["seed_everything"] == 42
    assert trainer["precision"] == expected["precision"]
    assert trainer["gradient_clip_val"] == 1.0
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
    assert (trainer["precision"], trainer["accumulate_grad_batches"], trainer["val_check_interval"]) == (
        "bf16-mixed", 8, 4000)
    assert trainer["callbacks"][0]["init_args"]["dirpath"] == "checkpoints/minimind3/pretrain"
    assert trainer["callbacks"][0]["init_args"]["every_n_train_steps"] == 1000


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def test_demo_pretrain_config_trains_with_the_shared_settings(tmp_path):
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.loggers import TensorBoardLogger

    from minimind_pl.tokenizer import train_tokenizer

    texts = [f"Fact {i}: the capital of country {i} is city {i * 7 % 13}. 算术：{i} + {i} = {2 * i}。"
             for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", texts[:32])
    val = write_jsonl(tmp_path / "val.jsonl", texts[32:])
    train_tokenizer([train], 320, tmp_path / "tokenizer", show_progress=False)  # the minimum is 36 + 256
    cli = main(["fit", "--config", str(CONFIG_ROOT / "demo" / "pretrain.yaml"),
                "--data.init_args.train_path", str(train), "--data.init_args.val_path", str(val),
                "--data.init_args.tokenizer", str(tmp_path / "tokenizer"), "--data.init_args.seq_len", "32",
                "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0",
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
                "--trainer.callbacks", json.dumps([{"init_args": {"dirpath": str(tmp_path / "ckpt")}}])])
    trainer = cli.trainer
    assert trainer.global_step == 2
    # from configs/demo/base.yaml
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert trainer.gradient_clip_val == 1.0 and trainer.log_every_n_steps == 10
    assert isinstance(trainer.logger, TensorBoardLogger) and trainer.logger.name == "pretrain"
    assert Path(trainer.logger.log_dir).parent == tmp_path / "logs" / "pretrain"
    assert trainer.checkpoint_callback.save_last is True
    # from configs/demo/pretrain.yaml
    assert trainer.max_epochs == 16 and cli.model.hparams.learning_rate == 3e-3
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
