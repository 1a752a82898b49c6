"""Tests for minimind_pl.lora and the LoRA stage: exactness, freezing, adapter files, resume, wrong bases."""
import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from minimind_pl.config import ModelConfig
from minimind_pl.checkpoints import load_model, read_torch_file
from minimind_pl.checkpoints.adapters import apply_lora_file, is_adapter, read_lora_file, save_lora
from minimind_pl.lora import (
    DEFAULT_TARGETS, MINIMIND_TARGETS, LoRAConfig, LoRALinear, apply_lora, count_parameters, lora_modules,
    lora_state_dict, merge_lora,
)
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.stages import LoRA


def tiny_config(**overrides) -> ModelConfig:
    """A very small model so every test runs in well under a second of compute."""
    return ModelConfig.from_preset("debug", vocab_size=128, **overrides)


def make_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A seeded tiny model in eval mode."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


def randomize_adapters(model: nn.Module) -> None:
    """Give every lora_B non-zero values, so the adapters really change the output."""
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(0.0, 0.05)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a forward pass without gradients."""
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def test_fresh_adapter_changes_nothing():
    model = make_model()
    before = logits(model, IDS)
    names = apply_lora(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    assert torch.equal(logits(model, IDS), before)


def test_merged_and_unmerged_give_the_same_logits():
    model = make_model()
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    randomize_adapters(model)
    unmerged = logits(model, IDS)
    assert not torch.allclose(unmerged, logits(make_model(), IDS), atol=1e-4)  # the adapters matter
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == base_keys
    assert torch.allclose(logits(model, IDS), unmerged, atol=1e-5)


def test_base_names_are_kept_and_everything_else_is_frozen():
    model = make_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model)
    state = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in state
    assert "model.layers.0.self_attn.q_proj.lora_A" in state
    result = model.load_state_dict(base_state, strict=False)  # a base checkpoint still loads
    assert not result.unexpected_keys and all(k.endswith(("lora_A", "lora_B")) for k in result.missing_keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_targets_minimind_choice_moe_and_typos():
    model = make_model()
    apply_lora(model, LoRAConfig(targets=MINIMIND_TARGETS))
    assert {n.rsplit(".", 1)[-1] for n in lora_modules(model)} == set(MINIMIND_TARGETS)
    moe = make_model(use_moe=True, num_experts=2)
    names = apply_lora(moe)
    assert "model.layers.0.mlp.experts.1.down_proj" in names
    assert "model.layers.0.mlp.gate" not in names  # the router stays a plain frozen layer
    with pytest.raises(ValueError, match="qproj"):
        apply_lora(make_model(), LoRAConfig(targets=("qproj",)))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_lora_linear_keeps_bias_and_config_validation():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x)) and layer.bias is base.bias
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def hand_lora(layer: LoRALinear, x: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + b + scale * x A^T B^T, written out with the layer's own tensors."""
    base = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
    return base + scale * (x @ layer.lora_A.T @ layer.lora_B.T)


def test_alpha_scales_the_update_by_alpha_over_rank():
    """An adapter with alpha 16 and rank 4 adds 4 x its low-rank product; merging keeps that scale."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=4, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), hand_lora(layer, x, 4.0), atol=1e-6)
        assert not torch.allclose(layer(x), hand_lora(layer, x, 1.0), atol=1e-3)  # the scale shows
        assert torch.allclose(layer.merged()(x), hand_lora(layer, x, 4.0), atol=1e-6)

    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=16.0))
    randomize_adapters(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(q_proj(h), hand_lora(q_proj, h, 4.0), atol=1e-6)
    unmerged = logits(model, IDS)
    assert torch.allclose(logits(merge_lora(model), IDS), unmerged, atol=1e-5)


def test_adapter_files_keep_the_scale(tmp_path):
    """Adapters with alpha != rank give the same model after a save_lora file or a LoRA stage checkpoint."""
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=16.0, targets=MINIMIND_TARGETS))
    randomize_adapters(model)
    expected = logits(model, IDS)
    h = torch.randn(2, model.config.hidden_size)
    fresh = apply_lora_file(make_model(), save_lora(model, tmp_path / "adapter.pth"))
    q_proj = fresh.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        assert torch.allclose(q_proj(h), hand_lora(q_proj, h, 4.0), atol=1e-6)
    assert torch.allclose(logits(fresh, IDS), expected, atol=1e-5)

    base = tmp_path / "base.pth"
    torch.save(make_model().state_dict(), base)
    stage = LoRA(config=tiny_config(), init_weights=str(base), lora_rank=4, lora_alpha=16.0)
    randomize_adapters(stage.model)
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)  # what Lightning's checkpointing calls
    torch.save(checkpoint, tmp_path / "lora.ckpt")
    loaded = load_model(str(tmp_path / "lora.ckpt"), device="cpu")
    q_proj = loaded.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.allclose(q_proj(h), hand_lora(q_proj, h, 4.0), atol=1e-6)
    assert torch.allclose(logits(loaded, IDS), logits(stage.model.eval(), IDS), atol=1e-5)


def test_adapter_file_roundtrip_and_contents(tmp_path):
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, targets=MINIMIND_TARGETS))
    randomize_adapters(model)
    path = save_lora(model, tmp_path / "adapter.pth", base="base.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw["lora_state_dict"]) == set(lora_state_dict(model))
    assert all(k.endswith(("lora_A", "lora_B")) for k in raw["lora_state_dict"])
    assert is_adapter(read_torch_file(path)) and read_lora_file(path).base == "base.pth"
    fresh = apply_lora_file(make_model(), path)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_minimind_lora_file_loads(tmp_path):
    """MiniMind's own adapter files (``<module>.lora.A.weight``, scale 1) load and give the same update."""
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, targets=MINIMIND_TARGETS))
    randomize_adapters(model)
    theirs = {k.replace(".lora_A", ".lora.A.weight").replace(".lora_B", ".lora.B.weight"): v
              for k, v in lora_state_dict(model).items()}
    torch.save(theirs, tmp_path / "lora_identity_64.pth")
    fresh = apply_lora_file(make_model(), tmp_path / "lora_identity_64.pth")
    assert read_lora_file(tmp_path / "lora_identity_64.pth").config.targets == MINIMIND_TARGETS
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_wrong_base_is_a_clear_error(tmp_path):
    model = make_model()
    apply_lora(model)
    save_lora(model, tmp_path / "adapter.pth")
    with pytest.raises(ValueError, match="another base model.*hidden_size"):
        apply_lora_file(make_model(hidden_size=32), tmp_path / "adapter.pth")
    bare = {k.replace(".lora_A", ".lora.A.weight").replace(".lora_B", ".lora.B.weight"): v
            for k, v in lora_state_dict(model).items()}  # no config recorded: shapes and names decide
    torch.save(bare, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="does not fit.*shape"):
        apply_lora_file(make_model(hidden_size=32, num_attention_heads=4), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="does not fit.*no module model.layers.1"):
        apply_lora_file(make_model(num_hidden_layers=1), tmp_path / "bare.pth")
    torch.save(make_model().state_dict(), tmp_path / "full.pth")
    assert not is_adapter(read_torch_file(tmp_path / "full.pth"))
    with pytest.raises(ValueError, match="no LoRA adapter tensors"):
        apply_lora_file(make_model(), tmp_path / "full.pth")


# ----------------------------------------------------------------------------- the Lightning stage


def batches(n: int = 4, batch: int = 2, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """In-memory batches in the data modules' format (labels already shifted, -100 ignored)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (batch, length + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : length // 2] = -100  # like SFT: only the answer is learned
        out.append({"input_ids": ids[:, :-1], "labels": labels, "real_tokens": torch.tensor(batch * length)})
    return out


def make_trainer(max_steps: int, root) -> L.Trainer:
    """A quiet CPU trainer for a few steps."""
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     num_sanity_val_steps=0, limit_val_batches=0)


@pytest.fixture()
def base_path(tmp_path):
    """A saved base model (MiniMind .pth layout) for ``--model.init_weights``."""
    path = tmp_path / "base.pth"
    torch.save(make_model().state_dict(), path)
    return path


def make_stage(base_path) -> LoRA:
    """The LoRA stage on the tiny base, rank 4, a learning rate big enough to move in 3 steps."""
    return LoRA(config=tiny_config(), init_weights=str(base_path), lora_rank=4, learning_rate=1e-2)


def test_stage_trains_only_adapters_and_checkpoints_hold_only_them(tmp_path, base_path):
    stage = make_stage(base_path)
    base_before = {k: v.clone() for k, v in stage.model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    b_before = stage.model.model.layers[0].self_attn.q_proj.lora_B.clone()
    trainer = make_trainer(3, tmp_path)
    trainer.fit(stage, DataLoader(batches(), batch_size=None))
    after = stage.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # bit-identical base
    assert not torch.equal(stage.model.model.layers[0].self_attn.q_proj.lora_B, b_before)
    trainable, total = count_parameters(stage.model)
    assert trainable == sum(t.numel() for t in lora_state_dict(stage.model).values()) < total

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in raw["state_dict"])
    assert raw["lora_base"] == str(base_path) and raw["lora_config"]["rank"] == 4
    assert raw["model_config"] == tiny_config().to_dict()

    # inference: base + adapter unmerged, from the base and --lora, or from the LoRA checkpoint alone
    expected = logits(stage.model.eval(), IDS)
    assert torch.allclose(logits(load_model(str(base_path), device="cpu", lora=str(ckpt)), IDS), expected)
    assert torch.allclose(logits(load_model(str(ckpt), device="cpu"), IDS), expected)


def test_resume_from_adapter_only_checkpoint(tmp_path, base_path):
    stage = make_stage(base_path)
    trainer = make_trainer(2, tmp_path)
    trainer.fit(stage, DataLoader(batches(), batch_size=None))
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {k: v.clone() for k, v in stage.adapter_state_dict().items()}

    restored = make_stage(base_path)  # fresh adapters; the resume must bring the trained ones back
    make_trainer(2, tmp_path).fit(restored, DataLoader(batches(), batch_size=None), ckpt_path=ckpt)
    assert all(torch.equal(restored.adapter_state_dict()[k], v) for k, v in saved.items())

    resumed = make_stage(base_path)
    trainer = make_trainer(3, tmp_path)
    trainer.fit(resumed, DataLoader(batches(), batch_size=None), ckpt_path=ckpt)
    assert trainer.global_step == 3


def test_resume_rejects_checkpoints_of_other_stages(tmp_path, base_path):
    bogus = tmp_path / "other.ckpt"
    stage = make_stage(base_path)
    trainer = make_trainer(1, tmp_path)
    trainer.fit(stage, DataLoader(batches(1), batch_size=None))
    trainer.save_checkpoint(bogus)
    raw = torch.load(bogus, weights_only=True)
    del raw["lora_config"]
    torch.save(raw, bogus)
    with pytest.raises(ValueError, match="not written by the LoRA stage"):
        make_trainer(2, tmp_path).fit(make_stage(base_path), DataLoader(batches(1), batch_size=None), ckpt_path=bogus)


def test_default_targets_cover_attention_and_mlp():
    assert set(DEFAULT_TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ----------------------------------------------------------------------------- exact settings and messages (issue 24)

from minimind_pl.lora import adapter_size, describe, lora_config_of  # noqa: E402


def test_lora_linear_freezes_its_base_and_starts_with_minimind_s_init():
    torch.manual_seed(0)
    base = nn.Linear(256, 256)
    layer = LoRALinear(base, rank=64)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.lora_B.any()
    # lora_A ~ normal(0, 0.02): 16384 values, so the mean is within 0.0005 of 0 and the std within 3% of 0.02
    lora_a = layer.lora_A.detach()
    assert abs(float(lora_a.mean())) < 0.0005 and float(lora_a.std()) == pytest.approx(0.02, rel=0.03)
    assert LoRALinear(nn.Linear(4, 3)).lora_A.shape == (8, 4)  # rank 8 by default


def test_lora_keeps_the_base_dtype_forward_and_merged():
    base = nn.Linear(4, 3).double()
    layer = LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64 and layer(x).dtype == torch.float64
    merged = layer.merged()
    assert merged.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(merged(x), hand_lora(layer, x, 2.0), atol=1e-6)


def test_dropout_reaches_the_adapters_and_their_config():
    model = make_model()
    config = LoRAConfig(rank=4, alpha=2.0, dropout=0.5, targets=MINIMIND_TARGETS)
    apply_lora(model, config)
    assert lora_config_of(model) == config
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
    h = torch.randn(4, model.config.hidden_size)
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(h), layer(h))  # half the adapter's inputs dropped, differently each call
        layer.eval()
        assert torch.equal(layer(h), layer(h))
    assert lora_config_of(apply_lora_to(make_model(), LoRAConfig(rank=2))).dropout == 0.0
    with pytest.raises(ValueError, match=r"^the model has no LoRA adapters$"):
        lora_config_of(make_model())


def apply_lora_to(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """``apply_lora`` that returns the model."""
    apply_lora(model, config)
    return model


class TopLevel(nn.Module):
    """A linear layer at the top of the module tree (its name has no dot)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_a_top_level_linear_layer_can_be_a_target():
    model = TopLevel()
    assert apply_lora(model, LoRAConfig(rank=2, targets="proj")) == ["proj"]  # a single name as a string
    assert isinstance(model.proj, LoRALinear) and lora_config_of(model).targets == ("proj",)


def test_lora_errors_name_the_problem_exactly():
    with pytest.raises(ValueError, match=r"^LoRA targets \['qproj'\] match no linear layer; the model's linear layers "
                                         r"are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', "
                                         r"'q_proj', 'up_proj', 'v_proj'\]$"):
        apply_lora(make_model(), LoRAConfig(targets=("qproj", "q_proj")))
    model = apply_lora_to(make_model(), LoRAConfig())
    with pytest.raises(ValueError, match=r"^the model already has LoRA adapters; merge_lora\(model\) first to stack "
                                         r"another$"):
        apply_lora(model)
    for rank in ("8", True, 0, -1):
        with pytest.raises(ValueError, match=rf"^LoRA rank must be a positive integer, got {rank!r}$"):
            LoRAConfig(rank=rank)
    assert LoRAConfig(rank=1).scaling == 1.0  # rank 1 is allowed
    for dropout in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^LoRA dropout must be in \[0, 1\), got {dropout}$"):
            LoRAConfig(dropout=dropout)
    with pytest.raises(ValueError, match=r"^LoRA targets must name at least one linear layer \(e\.g\. q_proj\)$"):
        LoRAConfig(targets=())


def test_reporting_the_adapter_size():
    assert describe(958_464, 65_068_416) == "LoRA: 958,464 trainable parameters (1.47% of 65,068,416)"
    assert describe(1, 1) == "LoRA: 1 trainable parameters (100.00% of 1)"
    assert describe(0, 0) == "LoRA: 0 trainable parameters (0.00% of 0)"
    model = apply_lora_to(TopLevel(), LoRAConfig(rank=2, targets="proj"))
    assert adapter_size(model) == (16, 64)  # A (2, 4) + B (4, 2) = 16 values, 4 bytes each
    assert adapter_size(model, bytes_per_value=2) == (16, 32)
