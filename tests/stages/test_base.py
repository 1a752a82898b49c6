"""The stage's tokenizer: one copy per run, read from ``--data.tokenizer``, shared by the stage and its callbacks."""
from __future__ import annotations

import pytest
import torch

from helpers import record_tokenizer_reads, tiny_run, training_side
from minimind_pl.cli import run_lightning
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.stages import SFT, Pretrain

TINY = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def test_a_fit_run_reads_the_tokenizer_once_for_the_stage_its_tag_weights_and_its_samples(tmp_path, shared_dir,
                                                                                           monkeypatch):
    """reason.yaml up-weights the think tags (their ids come from the tokenizer) and logs samples after validation
    (encoded and decoded with it): all through the stage's one copy."""
    readers = record_tokenizer_reads(monkeypatch)
    cli = run_lightning(tiny_run(tmp_path, shared_dir, "reason", "sft_real.jsonl", 2))
    assert cli.trainer.global_step == 2
    assert cli.model._special_ids is not None  # the tag ids were looked up
    assert "samples/text_summary" in logged_tags(cli)
    assert training_side(readers) == ["minimind_pl.stages.base"]
    assert cli.model.tokenizer.vocabulary_fingerprint == cli.datamodule.tokenizer.vocabulary_fingerprint


def logged_tags(cli) -> list[str]:
    """The tags of everything the run's TensorBoard logger wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    return [tag for tags in events.Tags().values() if isinstance(tags, list) for tag in tags]


def test_the_stage_reads_its_tokenizer_folder_once(tokenizer_dir, monkeypatch):
    readers = record_tokenizer_reads(monkeypatch)
    stage = SFT(config=TINY, tokenizer=str(tokenizer_dir), special_token_weight=10.0)
    assert stage.tokenizer is stage.tokenizer
    with pytest.warns(UserWarning, match="not single tokens"):  # <answer> is several tokens of MiniMind's
        stage.special_token_ids(torch.device("cpu"))
    assert stage.sample_prompt_ids(stage.tokenizer) == []
    assert readers == ["minimind_pl.stages.base"]


def test_a_stage_without_a_tokenizer_says_how_to_give_one(tmp_path):
    for stage in (Pretrain(config=TINY), SFT(config=TINY, special_token_weight=10.0)):
        with pytest.raises(UserError, match=r"needs the tokenizer: pass --data.tokenizer <folder>"):
            stage.tokenizer
    with pytest.raises(UserError, match=r"SFT needs the tokenizer: pass --data.tokenizer"):
        SFT(config=TINY, special_token_weight=10.0).special_token_ids(torch.device("cpu"))
    # a folder that is not there: built all the same (in a run the DataModule reports it first), the same
    # error as every other reader of a tokenizer folder on first use
    stage = Pretrain(config=TINY, tokenizer=str(tmp_path / "nope"))
    assert stage.tokenizer_fingerprint is None
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory not found: {tmp_path / 'nope'}"):
        stage.tokenizer
