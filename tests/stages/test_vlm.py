"""MiniMind-V's training stages (VLMPretrain, VLMSFT): what trains and what stays frozen, the optimizer, the
checkpoints (MiniMind-V's .pth plus the tower's record, never its weights), starting weights from a text or a
vision-language checkpoint, and another tower refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers import RecordBatches, REPO, fit, random_model, run_python, tiny_tower_folder, write_stage_checkpoint
from vlm_rows import ANSWERS, IMAGE_ID, PATCHES, colour_rows, loader
from minimind_pl import load_model
from minimind_pl.commands.export import export_command
from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError
from minimind_pl.losses import IGNORE_INDEX
from minimind_pl.stages import VLMSFT, VLMPretrain
from minimind_pl.vision.tower import load_vision_tower
from minimind_pl.vision.vlm import MiniMindVLM

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, vocab_size=6400,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return tiny_tower_folder(tmp_path_factory.mktemp("tower") / "siglip")


@pytest.fixture(scope="module")
def other_tower(tmp_path_factory):
    return tiny_tower_folder(tmp_path_factory.mktemp("tower") / "other", seed=1)


def stage(cls, tower, tokenizer_dir, **kwargs):
    torch.manual_seed(0)
    return cls(vision_encoder=str(tower), config=ModelConfig.from_preset("debug", **TINY), tokenizer=str(tokenizer_dir),
               seq_len=22, **kwargs)


def trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     gradient_clip_val=1.0)


def mean_loss(module, rows) -> float:
    module.eval()
    with torch.no_grad():
        return float(torch.stack([module.compute_loss(batch)[0] for batch in loader(rows)]).mean())


@pytest.mark.parametrize("cls", [VLMPretrain, VLMSFT])
def test_recipes_default_to_minimind_v_settings(cls, tower, tokenizer_dir):
    module = stage(cls, tower, tokenizer_dir)
    expected = {VLMPretrain: ("projector", 4e-4), VLMSFT: ("first_last", 5e-6)}[cls]
    assert (module.hparams.trainable, module.hparams.learning_rate) == expected
    assert isinstance(module.model, MiniMindVLM)
    vision = module.model.vision_config
    assert (vision.image_token_id, vision.image_token_len, vision.image_hidden_size) == (IMAGE_ID, PATCHES, 32)


def test_a_short_fit_learns_what_the_image_shows(tower, tokenizer_dir, tmp_path):
    """Held-out rows: the loss falls, and after training it is lower with each row's own image than with the
    other colour's (the answer is read from the image)."""
    module = stage(VLMSFT, tower, tokenizer_dir, trainable="all", learning_rate=1e-2)
    rows, held_out = colour_rows(32), colour_rows(16, seed=1)
    before = mean_loss(module, held_out)
    trainer(tmp_path, 48).fit(module.train(), loader(rows))
    after = mean_loss(module, held_out)
    swapped = [{**row, "pixel_values": other["pixel_values"]} for row, other in zip(held_out, held_out[1:] + held_out[:1])
               if not torch.equal(row["input_ids"], other["input_ids"])]
    assert after < 0.1 * before, (before, after)  # measured: 8.71 -> 0.11
    assert mean_loss(module, swapped) > after + 0.5, (after, mean_loss(module, swapped))  # measured: 1.30


def parameter_names(module, where):
    return {n for n, p in module.model.named_parameters() if where(n)}


@pytest.mark.parametrize("trainable", ["projector", "first_last", "all"])
def test_exactly_the_chosen_parameters_train(trainable, tower, tokenizer_dir, tmp_path):
    """After two steps every trained tensor moved, every other one (and the tower) is bit-identical; the optimizer
    holds the trained tensors and nothing else."""
    module = stage(VLMSFT, tower, tokenizer_dir, trainable=trainable, learning_rate=1e-3)
    last = module.config.num_hidden_layers - 1
    trained = {
        "projector": lambda n: n.startswith("vision_proj."),
        "first_last": lambda n: n.startswith(("vision_proj.", "model.layers.0.", f"model.layers.{last}.")),
        "all": lambda n: True,
    }[trainable]
    before = {n: p.detach().clone() for n, p in module.model.state_dict().items()}
    tower_before = {n: p.clone() for n, p in module.tower.state_dict().items()}
    fit = trainer(tmp_path, 2)
    fit.fit(module, loader(colour_rows(8)))
    after = module.model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if trained(n)}
    assert moved == expected
    assert all(torch.equal(tower_before[n], p) for n, p in module.tower.state_dict().items())
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    named = dict(module.model.named_parameters())  # the tied lm_head appears once, as model.embed_tokens
    assert optimised == {id(named[n]) for n in named if trained(n)}
    assert not optimised & {id(p) for p in module.tower.parameters()}


def test_a_batch_without_images_still_gives_the_projector_a_gradient(tower, tokenizer_dir):
    """Text-only batches: the projector joins the graph with zero gradients (DDP needs every trained parameter
    in every step), and the loss is exactly the text model's."""
    module = stage(VLMPretrain, tower, tokenizer_dir)
    batch = {k: v for k, v in next(iter(loader(colour_rows(2)))).items() if k != "pixel_values"}
    loss, _ = module.compute_loss(batch)
    loss.backward()
    grads = [p.grad for p in module.model.vision_proj.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    text_model = module.model
    with torch.no_grad():
        plain = text_model(batch["input_ids"]).logits
    from minimind_pl.losses import causal_lm_loss
    assert torch.equal(loss.detach(), causal_lm_loss(plain, batch["labels"]))


def fitted_checkpoint(cls, tower, tokenizer_dir, tmp_path, **kwargs):
    module = stage(cls, tower, tokenizer_dir, learning_rate=1e-3, **kwargs)
    fit = trainer(tmp_path, 2)
    fit.fit(module, loader(colour_rows(8)))
    path = tmp_path / "vlm.ckpt"
    fit.save_checkpoint(path)
    return module, path


def test_the_checkpoint_is_minimind_v_pth_plus_the_towers_record(tower, tokenizer_dir, tmp_path):
    module, path = fitted_checkpoint(VLMPretrain, tower, tokenizer_dir, tmp_path)
    saved = torch.load(path, weights_only=True)
    keys = {k.removeprefix("model.") for k in saved["state_dict"]}
    assert not any("vision_model" in k or "vision_encoder" in k for k in keys)
    assert {k for k in keys if k.startswith("vision_proj.")} == {f"vision_proj.mlp.{i}.{w}" for i in (0, 1, 3)
                                                               for w in ("weight", "bias")}
    assert saved["vision_encoder"] == str(tower)
    assert saved["vision_encoder_fingerprint"] == load_vision_tower(tower).fingerprint
    assert saved["vision_config"]["image_token_len"] == PATCHES and saved["stage"] == "VLMPretrain"
    # export --format minimind: MiniMind-V's .pth, which load_model reads back with the tower to the same logits
    export_command(str(path), str(tmp_path / "pretrain_vlm_32.pth"), dtype="float32")
    pth = torch.load(tmp_path / "pretrain_vlm_32.pth", weights_only=True)
    assert set(pth) == set(module.model.state_dict())
    rebuilt = load_model(tmp_path / "pretrain_vlm_32.pth", vision_encoder=tower, device="cpu")
    batch = next(iter(loader(colour_rows(2))))
    module.eval()
    with torch.no_grad():
        expected = module.model(batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        assert torch.equal(rebuilt(batch["input_ids"], pixel_values=batch["pixel_values"]).logits, expected)


def test_starting_weights_from_a_text_model_keep_its_language_model(tower, tokenizer_dir, tmp_path):
    text = random_model(**TINY)
    path = write_stage_checkpoint(text, tmp_path / "sft.ckpt", tokenizer_dir, stage="SFT")
    module = stage(VLMPretrain, tower, tokenizer_dir, init_weights=str(path))
    own = module.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in text.state_dict().items())


def test_starting_weights_from_a_vision_language_checkpoint_and_another_tower(tower, other_tower, tokenizer_dir,
                                                                              tmp_path):
    trained, path = fitted_checkpoint(VLMPretrain, tower, tokenizer_dir, tmp_path)
    sft = stage(VLMSFT, tower, tokenizer_dir, init_weights=str(path))
    assert all(torch.equal(sft.model.state_dict()[k], v) for k, v in trained.model.state_dict().items())
    with pytest.raises(UserError, match="another vision tower"):
        stage(VLMSFT, other_tower, tokenizer_dir, init_weights=str(path))
    with pytest.warns(UserWarning, match="another vision tower"):
        stage(VLMSFT, other_tower, tokenizer_dir, init_weights=str(path), allow_vision_encoder_mismatch=True)


class Recorder:
    """Stands in for TensorBoard's SummaryWriter: what was logged, by call."""

    def __init__(self) -> None:
        self.calls = []

    def add_image(self, tag, image, global_step):
        self.calls.append(("image", tag, image, global_step))

    def add_text(self, tag, text, global_step):
        self.calls.append(("text", tag, text, global_step))


def test_tensorboard_gets_the_first_image_of_the_validation_and_its_reference(tower, tokenizer_dir):
    """A batch whose first row has no image and whose second packs a text document before an image document: the
    logged image is the second row's, un-normalised (SigLIP's mean 0.5, std 0.5), with that document's text."""
    from types import SimpleNamespace

    from minimind_pl.callbacks import SampleLogger
    from minimind_pl.tokenizer import Tokenizer

    module = stage(VLMSFT, tower, tokenizer_dir)
    image_row = colour_rows(1)[0]
    text = torch.tensor([1, 50, 51, 52, 2])
    row1_ids = torch.cat([text, image_row["input_ids"]])
    pixels = torch.zeros(2, 1, 3, 32, 32)
    pixels[1, 0] = torch.tensor([0.8, -0.6, 0.0])[:, None, None]
    batch = {"input_ids": torch.stack([torch.cat([text, text, text[:-1], torch.tensor([2] * 13)]), row1_ids]),
             "labels": torch.stack([torch.full((27,), IGNORE_INDEX),
                                    torch.cat([torch.full((5,), IGNORE_INDEX), image_row["labels"]])]),
             "doc_ids": torch.stack([torch.zeros(27, dtype=torch.long), torch.tensor([0] * 5 + [1] * 22)]),
             "pixel_values": pixels}
    recorder = Recorder()
    trainer = SimpleNamespace(sanity_checking=False, global_rank=0, global_step=7, strategy=None,
                              logger=SimpleNamespace(experiment=recorder))
    logger = SampleLogger()
    logger.on_validation_batch_end(trainer, module, None, batch, 0)
    logger.on_validation_epoch_end(trainer, module)
    (_, image_tag, image, step), (_, text_tag, caption, _) = recorder.calls
    assert (image_tag, text_tag, step) == ("samples/image", "samples/image_text", 7)
    expected = torch.tensor([0.9, 0.2, 0.5])[:, None, None].expand(3, 32, 32)  # x * 0.5 + 0.5
    assert torch.allclose(image, expected)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir))
    prompt = tokenizer.decode([1, 40, 41, 42]) + "<image>"
    colour = int(image_row["input_ids"][-2] - ANSWERS[0])
    assert caption == (f"**{prompt}** → model: {tokenizer.decode(greedy(module.model, image_row, pixels[1]))} · "
                       f"reference: {tokenizer.decode([ANSWERS[colour], 2])}")
    logger.on_validation_epoch_end(trainer, module)  # the sample is logged once per validation
    assert len(recorder.calls) == 2


def greedy(model, row: dict, pixels: torch.Tensor, steps: int = 48) -> list[int]:
    """The model's greedy answer to ``row``'s prompt (up to its first label) and image, one full forward per token
    (no cache), ended by eos (2)."""
    ids = row["input_ids"][:int((row["labels"] != IGNORE_INDEX).nonzero()[0]) + 1].tolist()
    out = []
    with torch.no_grad():
        while len(out) < steps:
            token = int(model(torch.tensor([ids + out]), pixel_values=pixels[None]).logits[0, -1].argmax())
            if token == 2:
                break
            out.append(token)
    return out


def cli_run(tmp_path, tower, tokenizer_dir, steps: int, extra=()) -> list[str]:
    """``python main.py fit`` of VLMSFT on ``vlm_rows.ColourRows`` (tests on PYTHONPATH), a checkpoint every 2 steps."""
    callbacks = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                 f'{{"dirpath": "{tmp_path / "ckpt"}", "save_last": true, "every_n_train_steps": 2, "save_top_k": -1}}}}]')
    model = [a for k, v in TINY.items() for a in (f"--model.config.{k}", str(v))]
    return ["fit", "--seed_everything", "0", "--model.class_path", "minimind_pl.stages.VLMSFT",
            "--model.vision_encoder", str(tower), "--model.learning_rate", "1e-3", *model,
            "--data.class_path", "vlm_rows.ColourRows", "--data.tokenizer", str(tokenizer_dir),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
            "--trainer.gradient_clip_val", "1.0", "--trainer.val_check_interval", str(steps),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks", callbacks, *extra]


def test_a_resumed_run_ends_with_the_straight_runs_weights_and_another_tower_is_refused(
        tower, other_tower, tokenizer_dir, tmp_path, capsys):
    """With dropout: stopped after step 4 of 8 and resumed, it ends bit-identical (weights, loader position, RNG)."""
    extra = ["--model.config.dropout", "0.1"]
    straight = fit(cli_run(tmp_path / "a", tower, tokenizer_dir, 8, extra), RecordBatches())
    fit(cli_run(tmp_path / "b", tower, tokenizer_dir, 8, extra), RecordBatches(stop_after=4))
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed = fit(cli_run(tmp_path / "b", tower, tokenizer_dir, 8, [*extra, "--ckpt_path", str(last)]),
                  RecordBatches())
    assert resumed.trainer.global_step == 8
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    from minimind_pl.cli import main

    with pytest.raises(SystemExit) as done:
        main(cli_run(tmp_path / "c", other_tower, tokenizer_dir, 8, [*extra, "--ckpt_path", str(last)]))
    assert done.value.code == 2 and "another vision tower" in capsys.readouterr().err


def test_two_ddp_ranks_train_the_projector_and_end_blocks_only(tower, tokenizer_dir, tmp_path):
    """Two gloo processes, one row each, from 4 rows of which 2 have no image: each epoch's two global batches hold
    a rank batch without an image, whose projector would be unused (DDP then fails at the next step: checked by
    removing the projector's run on no features). The checkpoint's frozen blocks are still the text model's."""
    text = random_model(**TINY)
    start = write_stage_checkpoint(text, tmp_path / "sft.ckpt", tokenizer_dir, stage="SFT")
    args = cli_run(tmp_path, tower, tokenizer_dir, 3, [
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size", "1",
        "--data.rows", "4", "--data.text_only_every", "2", "--model.init_weights", str(start)])
    result = run_python([str(REPO / "main.py"), *args], env={"PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 0, result.stderr[-4000:]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    last = TINY["num_hidden_layers"] - 1
    for name, value in text.state_dict().items():
        trained = name.startswith(("model.layers.0.", f"model.layers.{last}."))
        assert torch.equal(saved["model." + name], value) != trained, name
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_data_that_write_another_placeholder_id_or_count_or_tower_are_refused(tower, other_tower, tokenizer_dir):
    from types import SimpleNamespace

    from minimind_pl.stages.vision_language import check_data_agrees

    vision = stage(VLMSFT, tower, tokenizer_dir).model.vision_config
    data = dict(image_token=vision.image_token, image_token_id=IMAGE_ID, image_token_len=PATCHES, vision_encoder=tower)
    check_data_agrees(SimpleNamespace(**data), vision, str(tower))  # the same: accepted
    for change, message in [({"image_token_id": 99}, "writes '<|image_pad|>' as id 99 but the model reads id 12"),
                            ({"image_token_len": 4}, f"image_token_len 4 but the tower gives {PATCHES}"),
                            ({"vision_encoder": other_tower}, "--data.vision_encoder")]:
        with pytest.raises(UserError, match=message.replace("|", r"\|")):
            check_data_agrees(SimpleNamespace(**{**data, **change}), vision, str(tower))
