"""What every weight format shares: the safe torch.load and its errors, prefixes, non-finite tensors; MiniMind's
.pth files written and their config read off the shapes."""

from __future__ import annotations

import datetime

import pytest
import torch

from minimind_pl.checkpoints import infer_config
from minimind_pl.checkpoints.files import nonfinite_tensors, read_torch_file, strip_prefix, strip_wrappers
from minimind_pl.checkpoints.minimind import save_minimind
from minimind_pl.errors import UserError

from helpers import random_model


def test_reading_names_the_file_and_what_it_was_meant_to_be(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^LoRA adapter not found: {tmp_path / 'a.pth'}$"):
        read_torch_file(tmp_path / "a.pth", "LoRA adapter")
    with pytest.raises(FileNotFoundError, match=f"^checkpoint not found: {tmp_path / 'a.pth'}$"):
        read_torch_file(tmp_path / "a.pth")
    with pytest.raises(IsADirectoryError, match=f"^checkpoint {tmp_path} is a folder, not a file$"):
        read_torch_file(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"^cannot read weights {tmp_path / 'junk.pth'}: "):
        read_torch_file(tmp_path / "junk.pth", "weights")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "ok.pth")
    loaded = read_torch_file(tmp_path / "ok.pth")
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.ones(2)) and loaded["w"].device.type == "cpu"


@pytest.mark.parametrize("zip_format", [True, False])
def test_only_tensors_and_plain_containers_are_read(tmp_path, zip_format):
    """A file that would run code when unpickled (any other object) is refused, in either file format."""
    torch.save({"w": torch.ones(1), "when": datetime.date(2026, 1, 1)}, tmp_path / "x.pth",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match="^cannot read checkpoint .*x.pth: .*Weights only load failed"):
        read_torch_file(tmp_path / "x.pth")


def test_prefixes():
    assert strip_prefix({"model.a": 1, "b": 2, "model.model.c": 3}, "model.") == {"a": 1, "model.c": 3}
    assert strip_wrappers("module._orig_mod.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert strip_wrappers("model.module.weight") == "model.module.weight"


def test_nonfinite_tensors_are_named():
    tensors = [("nan", torch.tensor([1.0, float("nan")])), ("ok", torch.ones(3)), ("inf", torch.tensor([-float("inf")])),
               ("int", torch.tensor([1])), ("step", 3)]
    assert nonfinite_tensors(tensors) == ["nan", "inf"]
    assert nonfinite_tensors(tensors[1:2]) == [] and nonfinite_tensors(tensors[3:]) == []


def test_a_minimind_pth_is_every_tensor_in_half_precision(tmp_path):
    model = random_model()
    path = save_minimind(model.state_dict(), tmp_path / "out" / "sft" / "full_sft_64.pth")  # folders made
    saved = torch.load(path, weights_only=True)
    assert path == tmp_path / "out" / "sft" / "full_sft_64.pth" and set(saved) == set(model.state_dict())  # lm_head kept
    for name, tensor in model.state_dict().items():
        assert saved[name].dtype == torch.float16 and torch.equal(saved[name], tensor.half())
    assert torch.load(save_minimind(model.state_dict(), tmp_path / "f.pth", torch.float32),
                      weights_only=True)["lm_head.weight"].dtype == torch.float32


def test_inferring_a_config_needs_the_embeddings_and_the_layers():
    state = random_model().state_dict()
    with pytest.raises(UserError, match="^cannot infer a model config: the state dict has neither "
                                        "model.embed_tokens.weight nor lm_head.weight$"):
        infer_config({k: v for k, v in state.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")})
    with pytest.raises(UserError, match="^cannot infer a model config: the state dict has no model.layers.\\*$"):
        infer_config({k: v for k, v in state.items() if not k.startswith("model.layers.")})
    assert infer_config({k: v for k, v in state.items() if k != "lm_head.weight"})["tie_word_embeddings"]
    head_only = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
    assert infer_config(head_only)["vocab_size"] == state["lm_head.weight"].shape[0]


def test_head_width_and_expert_width_are_read_off_the_shapes():
    state = random_model(head_dim=48, use_moe=True, num_experts=3, moe_intermediate_size=40).state_dict()
    config = infer_config(state)
    assert (config["head_dim"], config["num_attention_heads"], config["num_experts"]) == (48, 4, 3)
    assert config["moe_intermediate_size"] == 40
