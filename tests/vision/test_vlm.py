"""The vision-language model: the merge rule on hand-built rows, and whole-model logits against transformers
(Qwen3ForCausalLM fed inputs_embeds from SiglipVisionModel / CLIPVisionModel and a projector written here)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import random_vlm, require_module, tiny_tower_folder
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.vision.config import VISION_PRESETS, VisionConfig
from minimind_pl.vision.vlm import MiniMindVLM, merge_image_features

P = 12  # the placeholder id
_ = None  # a position that keeps its token embedding


def features_table(b: int, n: int, length: int) -> torch.Tensor:
    """(B, N, L, 2) features whose values say where they came from: 1000*row + 100*image + slot."""
    value = (1000 * torch.arange(b)[:, None, None] + 100 * torch.arange(n)[None, :, None]
             + torch.arange(length)[None, None, :]).float()
    return value[..., None].expand(b, n, length, 2)


def merged_sources(rows: list[list[int]], n: int, length: int) -> list[list]:
    """Per position: (image, slot) it took, or None when it kept its embedding (-1 everywhere)."""
    ids = torch.tensor(rows)
    embeds = torch.full((*ids.shape, 2), -1.0)
    out = merge_image_features(ids, embeds, features_table(len(rows), n, length), P)[..., 0]
    return [[_ if v < 0 else (int(v) % 1000 // 100, int(v) % 100) for v in row.tolist()] for row in out]


def test_the_kth_run_takes_the_kth_image():
    assert merged_sources([[5, P, P, P, 7, P, P, P, 8]], n=2, length=3) == [
        [_, (0, 0), (0, 1), (0, 2), _, (1, 0), (1, 1), (1, 2), _]]


def test_a_truncated_run_takes_the_first_features():
    assert merged_sources([[5, P, P, P, 9, P]], n=2, length=3) == [[_, (0, 0), (0, 1), (0, 2), _, (1, 0)]]
    assert merged_sources([[4, P, P]], n=1, length=3) == [[_, (0, 0), (0, 1)]]


def test_a_short_run_opening_the_row_is_the_rest_of_a_cut_image_and_takes_its_last_features():
    """A packed row that starts inside an image (the previous row ended in its first tokens): the tail's tokens
    stand for the image's last features; the row's next run is its second image, from the first feature."""
    assert merged_sources([[P, P, 4, P, P, P, 5]], n=2, length=3) == [[(0, 1), (0, 2), _, (1, 0), (1, 1), (1, 2), _]]
    assert merged_sources([[P, 4, 4]], n=1, length=3) == [[(0, 2), _, _]]
    assert merged_sources([[P, P, P, 4]], n=1, length=3) == [[(0, 0), (0, 1), (0, 2), _]]  # a whole image


def test_rows_without_images_and_padding_images_stay_unused():
    """Row 0 has no placeholder, row 1 one image: their padding images (zero features here too) go nowhere;
    each row reads its own images, not its neighbour's."""
    assert merged_sources([[1, 2, 3, 4, 5], [4, P, P, 4, 4]], n=2, length=2) == [
        [_, _, _, _, _], [_, (0, 0), (0, 1), _, _]]
    ids = torch.tensor([[4, P, P, 4, 4]] * 2)
    out = merge_image_features(ids, torch.zeros(2, 5, 2), features_table(2, 1, 2), P)
    assert out[1, 1, 0].item() == 1000  # row 1's image 0


def test_runs_beyond_the_rows_images_keep_their_embeddings():
    assert merged_sources([[P, P, 3, P, P, 3, P, P]], n=2, length=2) == [
        [(0, 0), (0, 1), _, (1, 0), (1, 1), _, _, _]]


def test_adjacent_images_split_a_long_run_into_images():
    assert merged_sources([[P, P, P, P, P, 3]], n=3, length=2) == [[(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), _]]


def test_merged_features_carry_gradients_to_the_projector_side():
    features = torch.randn(1, 2, 2, 4, requires_grad=True)
    out = merge_image_features(torch.tensor([[P, P, 3]]), torch.zeros(1, 3, 4), features, P)
    out.sum().backward()
    assert features.grad[0, 0].eq(1).all() and features.grad[0, 1].eq(0).all()  # the unused image gets none


def test_only_the_images_a_run_takes_go_through_the_tower(tmp_path):
    """Row 0 takes two images, row 1 one (its second slot is the batch's zero padding), row 2 none: the tower reads
    3 images, and the logits are those of a tower that read all six."""
    model = tiny_vlm(tmp_path, "siglip", "mlp")
    run = [P] * 16  # the tiny tower's features per image
    ids = torch.tensor([[5, *run, 6, *run, 7], [5, *run, 6, *[8] * 17], [5, *[9] * 34]])
    pixels = torch.randn(3, 2, 3, 32, 32)
    seen = []
    hook = model.tower.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    assert seen == [3]
    with torch.no_grad():  # every image through the tower, then merged by the same rule
        features = model.vision_proj(model.tower(pixels.flatten(0, 1))).view(3, 2, 16, -1)
        embeds = merge_image_features(ids, model.model.embed_tokens(ids), features, P)
        expected = MiniMindForCausalLM.forward(model, ids, inputs_embeds=embeds).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    with torch.no_grad():  # images that no run takes: the tower is not called, the text's logits are unchanged
        alone = model(ids[2:], pixel_values=pixels[2:]).logits
    hook.remove()
    assert seen == [3, 6] and torch.equal(alone, model(ids[2:]).logits)  # 6: the reference's own call


# ----------------------------------------------------------------------------- the whole model

def tiny_vlm(tmp_path, family: str, projector: str, seed: int = 0) -> MiniMindVLM:
    """A debug-size LM with random weights, a tiny random tower (16 features of width 32) and a random projector."""
    return random_vlm(tiny_tower_folder(tmp_path / family, family), projector, seed)


def reference_logits(model: MiniMindVLM, folder, family: str, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' tower and Qwen3ForCausalLM with our weights; the projector written from MiniMind-V's facts;
    features merged by MiniMind-V's loop (count_vision_proj: the k-th run takes image k's first features)."""
    transformers = require_module("transformers")
    from test_model import copy_weights_to_hf, hf_config_kwargs

    tower_class = transformers.SiglipVisionModel if family == "siglip" else transformers.CLIPVisionModel
    tower = tower_class.from_pretrained(folder).eval()
    config = transformers.Qwen3Config(**hf_config_kwargs(model.config))
    config._attn_implementation = "eager"
    lm = transformers.Qwen3ForCausalLM(config).eval()
    sd = model.state_dict()
    text_model = MiniMindForCausalLM(model.config)
    text_model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("vision_proj.")})
    copy_weights_to_hf(text_model, lm)
    with torch.no_grad():
        b, n = pixels.shape[:2]
        hidden = tower(pixel_values=pixels.flatten(0, 1)).last_hidden_state
        hidden = hidden if family == "siglip" else hidden[:, 1:]
        if model.vision_config.projector == "mlp":  # LayerNorm -> Linear -> GELU -> Linear
            x = torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],), sd["vision_proj.mlp.0.weight"],
                                               sd["vision_proj.mlp.0.bias"], eps=1e-5)
            x = torch.nn.functional.gelu(x @ sd["vision_proj.mlp.1.weight"].T + sd["vision_proj.mlp.1.bias"])
            x = x @ sd["vision_proj.mlp.3.weight"].T + sd["vision_proj.mlp.3.bias"]
        else:
            x = hidden @ sd["vision_proj.vision_proj.0.weight"].T + sd["vision_proj.vision_proj.0.bias"]
        features = x.view(b, n, *x.shape[1:])
        embeds = lm.model.embed_tokens(ids).clone()
        for row in range(b):
            tokens, i, k = ids[row].tolist(), 0, 0
            while i < len(tokens):
                if tokens[i] != model.vision_config.image_token_id:
                    i += 1
                    continue
                start = i
                while i < len(tokens) and tokens[i] == model.vision_config.image_token_id:
                    i += 1
                if k < n:
                    embeds[row, start:i] = features[row, k, :i - start]
                    k += 1
        return lm(inputs_embeds=embeds).logits


def image_rows(length: int) -> torch.Tensor:
    """Three rows: two images, one image cut by truncation, no image."""
    torch.manual_seed(1)
    text = lambda count: torch.randint(20, 6000, (count,)).tolist()  # noqa: E731 - ids away from the placeholder
    rows = [text(3) + [P] * length + text(2) + [P] * length + text(3),
            text(11) + [P] * length + text(6) + [P] * length,  # the second run cut to 7 placeholders
            text(3 + 2 * length + 5)]
    return torch.tensor([row[:3 + 2 * length + 5] for row in rows])


@pytest.mark.parametrize("family,projector", [("siglip", "mlp"), ("clip", "linear")])
def test_logits_equal_transformers_qwen3_with_its_vision_tower(tmp_path, family, projector):
    model = tiny_vlm(tmp_path, family, projector)
    ids = image_rows(16)
    pixels = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels).logits
        text_only = model(ids).logits
    expected = reference_logits(model, tmp_path / family, family, ids, pixels)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (ours[:2] - text_only[:2]).abs().max().item() > 1e-2  # the images did change the rows that hold them
    torch.testing.assert_close(ours[2], text_only[2], rtol=0, atol=0)


def test_the_tower_is_no_part_of_the_state_dict_or_parameters(tmp_path):
    model = tiny_vlm(tmp_path, "siglip", "mlp")
    names = set(model.state_dict())
    assert {"vision_proj.mlp.0.weight", "vision_proj.mlp.1.weight", "vision_proj.mlp.3.bias"} <= names
    assert all(k.startswith(("model.", "lm_head.", "vision_proj.")) for k in names)
    tower_ids = {id(p) for p in model.tower.parameters()}
    assert not tower_ids & {id(p) for p in model.parameters()}


def test_images_only_at_prefill_and_a_tower_is_needed(tmp_path):
    model = tiny_vlm(tmp_path, "siglip", "mlp")
    ids, pixels = image_rows(16)[:1], torch.randn(1, 2, 3, 32, 32)
    cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="prefill only"):
        model(ids[:, -1:], past_key_values=cache, pixel_values=pixels)
    model.attach_tower(None)
    with pytest.raises(ValueError, match="no vision tower"):
        model(ids, pixel_values=pixels)


def test_presets_are_the_two_minimind_v_generations():
    assert VISION_PRESETS["minimind-3v"] == VisionConfig("<|image_pad|>", 12, 64, 768, "mlp")
    assert VISION_PRESETS["minimind2-v"] == VisionConfig("@", 34, 196, 768, "linear")


@pytest.mark.skipif(not os.environ.get("MINIMIND_V_SRC"), reason="MINIMIND_V_SRC names no MiniMind-V checkout")
def test_logits_equal_minimind_v_own_code(tmp_path):
    """MiniMind-V's model/model_minimind.py + model/model_vlm.py (set MINIMIND_V_SRC to a checkout), with its
    SiglipVisionModel replaced by our tiny random folder's: same weights, same logits."""
    import importlib.util
    import shutil
    import sys

    source = tmp_path / "minimind_v_model"
    shutil.copytree(os.path.join(os.environ["MINIMIND_V_SRC"], "model"), source,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pth", "siglip*", "clip*"))
    spec = importlib.util.spec_from_file_location("minimind_v_model", source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["minimind_v_model"] = package
    try:
        spec.loader.exec_module(package)
        vlm_module = importlib.import_module("minimind_v_model.model_vlm")
        ours = tiny_vlm(tmp_path, "siglip", "mlp")
        c = ours.config
        config = vlm_module.VLMConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                                      num_attention_heads=c.num_attention_heads,
                                      num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                                      intermediate_size=c.intermediate_size, image_hidden_size=32,
                                      image_token_len=16, max_position_embeddings=c.max_position_embeddings)
        theirs = vlm_module.MiniMindVLM(config, vision_model_path=str(tmp_path / "siglip"))
        assert theirs.vision_encoder is not None
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("vision_encoder.") or "freqs" in k for k in missing)
        theirs.eval()
        ids, pixels = image_rows(16), torch.randn(3, 2, 3, 32, 32)
        with torch.no_grad():
            # its data hands the image processor's output over: a dict {"pixel_values": (B, N, 3, H, W)}
            expected = theirs(ids, pixel_values={"pixel_values": pixels}).logits
            got = ours(ids, pixel_values=pixels).logits
            assert (expected - theirs(ids).logits)[:2].abs().max().item() > 1e-2  # its images were read
        print(f"max |logit difference| vs MiniMind-V's code: {(got - expected).abs().max().item():.3g}")
        assert (got - expected).abs().max().item() <= 1e-5
    finally:
        for name in [m for m in sys.modules if m.startswith("minimind_v_model")]:
            del sys.modules[name]
