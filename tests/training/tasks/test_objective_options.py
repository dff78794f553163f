"""Each objective option, from config to the loss it computes: stub UNets that return a known
prediction make the loss a hand-computable number. Also the EMA's update and its save/restore
(no Ray, no DeepSpeed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.checkpoint.loading import load_ema
from training.checkpoint.writer import save_ema
from training.config import EMAConfig, NoiseSchedulerConfig, TrainConfig, config_from_dict
from training.errors import ConfigError
from training.loader.batch import Batch
from training.models.noise import build_noise_scheduler, sampling_scheduler
from training.runtime.engine import build_ema
from training.tasks.diffusion_loss import ObjectiveOptions, diffusion_loss, drop_captions
from training.tasks.ldm import LatentDiffusionTask

SHAPE = (4, 4, 8, 8)


class StubUNet(torch.nn.Module):
    """Returns `predict(noisy, timesteps)` (zeros by default) in its own dtype; records its inputs."""

    def __init__(self, predict=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype))  # gives the stub its dtype
        self.predict = predict or (lambda noisy, t: torch.zeros_like(noisy))
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.inputs.append((sample, timestep, encoder_hidden_states))
        prediction = self.predict(sample, timestep).to(self.anchor.dtype)
        return SimpleNamespace(sample=prediction + self.anchor)

    def backward(self, loss):  # what the training loop asks of a DeepSpeed engine
        self.loss = loss


def scheduler(**fields):
    return build_noise_scheduler(NoiseSchedulerConfig(**fields))


def hand_alphas_cumprod(schedule: str, start=0.00085, end=0.012, steps=1000) -> np.ndarray:
    """Betas as DDPM (linear) and Stable Diffusion (scaled_linear) define them, in float64."""
    if schedule == "linear":
        betas = np.linspace(start, end, steps)
    else:
        betas = np.linspace(start**0.5, end**0.5, steps) ** 2
    return np.cumprod(1.0 - betas)


def broadcast(values: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    states = torch.randn(SHAPE[0], 3, 8, generator=g)
    return latents, noise, states


# --- prediction type ---------------------------------------------------------------------------


def test_epsilon_targets_the_noise_and_v_prediction_the_velocity():
    latents, noise, states = data()
    t = torch.tensor([5, 200, 600, 990])
    ac = broadcast(hand_alphas_cumprod("scaled_linear"), t)
    velocity = (ac.sqrt() * noise - (1 - ac).sqrt() * latents).float()  # Salimans & Ho 2022
    predicts_noise = StubUNet(lambda noisy, _: noise)
    predicts_velocity = StubUNet(lambda noisy, _: velocity)

    eps = scheduler(prediction_type="epsilon")
    assert diffusion_loss(predicts_noise, eps, latents, states, None, timesteps=t, noise=noise) == 0
    assert diffusion_loss(predicts_velocity, eps, latents, states, None, timesteps=t, noise=noise) > 0.5

    v = scheduler(prediction_type="v_prediction")
    assert diffusion_loss(predicts_velocity, v, latents, states, None, timesteps=t, noise=noise) < 1e-10
    assert diffusion_loss(predicts_noise, v, latents, states, None, timesteps=t, noise=noise) > 0.5


# --- min-SNR-gamma -----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_sample_as_the_paper_does(prediction_type):
    latents, noise, states = data()
    t = torch.tensor([1, 60, 400, 999])  # SNR from ~1000 down to ~0.005: both sides of gamma
    gamma = 5.0
    ac = hand_alphas_cumprod("scaled_linear")[t.numpy()]
    snr = ac / (1 - ac)
    assert snr.max() > gamma > snr.min()
    # A UNet that predicts zeros: each sample's MSE is its target's mean square.
    a, s = torch.tensor(ac).sqrt().view(-1, 1, 1, 1), torch.tensor(1 - ac).sqrt().view(-1, 1, 1, 1)
    target = noise.double() if prediction_type == "epsilon" else a * noise - s * latents
    per_sample = target.square().mean(dim=(1, 2, 3)).numpy()
    weights = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)

    sched = scheduler(prediction_type=prediction_type)
    options = ObjectiveOptions.from_train(config_from_dict({"train": {"snr_gamma": gamma}}).train)
    weighted = diffusion_loss(StubUNet(), sched, latents, states, None, options=options, timesteps=t, noise=noise)
    plain = diffusion_loss(StubUNet(), sched, latents, states, None, timesteps=t, noise=noise)
    assert weighted.item() == pytest.approx((weights * per_sample).mean(), rel=1e-5)
    assert plain.item() == pytest.approx(per_sample.mean(), rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 0.05 * plain.item()


# --- timestep sampling -------------------------------------------------------------------------


def test_logit_normal_timesteps_are_what_the_unet_sees_and_follow_the_distribution():
    n, steps = 20000, 1000
    latents, states = torch.zeros(n, 1, 1, 1), torch.zeros(n, 1, 4)
    sched = scheduler(prediction_type="v_prediction", num_train_timesteps=steps)

    def seen(train: dict, seed: int = 0) -> torch.Tensor:
        unet = StubUNet()
        options = ObjectiveOptions.from_train(config_from_dict({"train": train}).train)
        diffusion_loss(unet, sched, latents, states, torch.Generator().manual_seed(seed), options=options)
        return unet.inputs[0][1]

    uniform = seen({})
    middle = seen({"timestep_sampling": "logit_normal"})
    later = seen({"timestep_sampling": "logit_normal", "timestep_mean": 1.0, "timestep_std": 0.5})
    for t in (uniform, middle, later):
        assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= steps - 1

    def share(t, lo, hi):  # fraction of samples with lo <= t < hi
        return float(((t >= lo) & (t < hi)).float().mean())

    # Uniform: a tenth in each tenth. Logit-normal(0, 1): sigmoid(+-0.405) bounds the middle fifth,
    # P(|z| < 0.405) = 0.315 of the samples there, and P(z > 2.197) = 0.014 in the last tenth.
    assert share(uniform, 400, 600) == pytest.approx(0.2, abs=0.015)
    assert share(middle, 400, 600) == pytest.approx(0.315, abs=0.015)
    assert share(middle, 900, 1000) == pytest.approx(0.014, abs=0.005)
    assert float(middle.float().median()) == pytest.approx(500, abs=15)
    # mean 1, std 0.5: the median at T * sigmoid(1) = 731.
    assert float(later.float().median()) == pytest.approx(731, abs=15)
    # Drawn from the generator: a seed gives the same timesteps.
    assert torch.equal(middle, seen({"timestep_sampling": "logit_normal"}))
    assert not torch.equal(middle, seen({"timestep_sampling": "logit_normal"}, seed=1))


# --- noise offset ------------------------------------------------------------------------------


def test_noise_offset_shifts_each_channel_of_the_noise_and_raises_the_loss():
    # Clean latents of zeros at t = T-1: the UNet's input is sqrt(1 - alpha_bar) * noise, so the
    # noise itself can be read off the input, and (epsilon, zero prediction) the loss is mean(noise^2).
    offset = 0.5
    b, c, h, w = 256, 4, 16, 16
    latents, states = torch.zeros(b, c, h, w), torch.zeros(b, 3, 8)
    t = torch.full((b,), 999)
    sched = scheduler(prediction_type="epsilon")
    options = ObjectiveOptions.from_train(config_from_dict({"train": {"noise_offset": offset}}).train)

    def noise_and_loss(options):
        unet = StubUNet()
        loss = diffusion_loss(unet, sched, latents, states, torch.Generator().manual_seed(0), options=options,
                              timesteps=t)
        noise = unet.inputs[0][0] / (1 - sched.alphas_cumprod[999]).sqrt()
        return noise, loss.item()

    plain_noise, plain_loss = noise_and_loss(ObjectiveOptions())
    noise, loss = noise_and_loss(options)
    # Per-(sample, channel) means over H, W: variance 1/(h*w) without an offset, offset^2 + 1/(h*w) with.
    assert plain_noise.mean(dim=(2, 3)).var().item() == pytest.approx(1 / (h * w), rel=0.15)
    assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(offset**2 + 1 / (h * w), rel=0.15)
    # The offset is constant over H, W: removing each channel's mean leaves the same fluctuations.
    centred = noise - noise.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(centred, plain_noise - plain_noise.mean(dim=(2, 3), keepdim=True), atol=1e-5)
    assert plain_loss == pytest.approx(1.0, abs=0.02)
    assert loss - plain_loss == pytest.approx(offset**2, abs=0.04)


# --- caption dropout ---------------------------------------------------------------------------


def test_caption_dropout_empties_captions_at_the_configured_rate():
    captions = [f"caption {i}" for i in range(4000)]
    p = config_from_dict({"train": {"caption_dropout": 0.25}}).train.caption_dropout
    dropped = drop_captions(captions, p, torch.Generator().manual_seed(0))
    empty = [i for i, c in enumerate(dropped) if c == ""]
    assert abs(len(empty) - 1000) < 5 * (4000 * 0.25 * 0.75) ** 0.5  # within 5 sd of the binomial mean
    assert all(dropped[i] == captions[i] for i in range(len(captions)) if i not in set(empty))
    assert drop_captions(captions, 0.0, torch.Generator()) == captions


# --- beta schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_beta_schedule_defines_the_noised_latents(schedule):
    sched = scheduler(beta_schedule=schedule, prediction_type="epsilon")
    ac = hand_alphas_cumprod(schedule)
    betas = np.linspace(0.00085, 0.012, 1000) if schedule == "linear" else \
        np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-5)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ac, rtol=2e-4)

    latents, noise, states = data()
    t = torch.tensor([0, 100, 500, 999])
    unet = StubUNet()
    diffusion_loss(unet, sched, latents, states, None, timesteps=t, noise=noise)
    a = broadcast(ac, t)
    expected = a.sqrt() * latents + (1 - a).sqrt() * noise
    torch.testing.assert_close(unet.inputs[0][0].double(), expected, rtol=0, atol=1e-5)


def test_linear_and_scaled_linear_schedules_noise_differently():
    latents, noise, states = data()
    t = torch.tensor([300] * SHAPE[0])
    inputs = {}
    for schedule in ("linear", "scaled_linear"):
        unet = StubUNet()
        diffusion_loss(unet, scheduler(beta_schedule=schedule), latents, states, None, timesteps=t, noise=noise)
        inputs[schedule] = unet.inputs[0][0]
    assert (inputs["linear"] - inputs["scaled_linear"]).abs().max() > 0.05


# --- zero terminal SNR -------------------------------------------------------------------------


def test_zero_terminal_snr_makes_the_last_step_pure_noise_and_its_loss_finite():
    cfg = config_from_dict({"model": {"scheduler": {"zero_terminal_snr": True, "prediction_type": "v_prediction"}}})
    sched = build_noise_scheduler(cfg.model.scheduler)
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert scheduler(prediction_type="v_prediction").alphas_cumprod[-1].item() > 0.004  # SD's schedule: not 0

    latents, noise, states = data()
    t = torch.full((SHAPE[0],), 999)
    unet = StubUNet()
    loss = diffusion_loss(unet, sched, latents, states, None, timesteps=t, noise=noise)
    assert torch.equal(unet.inputs[0][0], noise)  # the input is the noise alone
    # v = sqrt(a) * noise - sqrt(1 - a) * x0 = -x0 at a = 0: a zero prediction costs mean(x0^2).
    assert loss.item() == pytest.approx(latents.square().mean().item(), rel=1e-6)
    weighted = diffusion_loss(StubUNet(), sched, latents, states, None, timesteps=t, noise=noise,
                              options=ObjectiveOptions(snr_gamma=5.0))
    assert torch.isfinite(weighted)  # min(SNR, gamma) / (SNR + 1) = 0 at SNR 0: no division by zero


def test_zero_terminal_snr_samples_from_the_last_timestep():
    zero = sampling_scheduler(scheduler(zero_terminal_snr=True, prediction_type="v_prediction"))
    zero.set_timesteps(10)
    assert zero.config.timestep_spacing == "trailing" and zero.timesteps[0].item() == 999
    assert zero.alphas_cumprod[-1].item() == 0.0
    plain = sampling_scheduler(scheduler())
    plain.set_timesteps(10)
    assert plain.timesteps[0].item() < 999  # leading spacing never reaches T-1


def test_zero_terminal_snr_refuses_epsilon():
    with pytest.raises(ConfigError, match="model.scheduler.zero_terminal_snr.*v_prediction"):
        config_from_dict({"model": {"scheduler": {"zero_terminal_snr": True}}})


@pytest.mark.parametrize("override, key", [("train.snr_gamma=0", "train.snr_gamma"),
                                           ("train.noise_offset=-0.1", "train.noise_offset"),
                                           ("train.timestep_sampling=lognormal", "train.timestep_sampling"),
                                           ("train.timestep_std=0", "train.timestep_std")])
def test_objective_options_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({}, [override])


# --- precision of the noising ------------------------------------------------------------------


def test_noising_runs_in_fp32_for_a_bf16_unet():
    latents, _, states = data()
    sched = scheduler(prediction_type="epsilon")
    t = torch.tensor([1, 3, 10, 20])  # small t: the noise is a small fraction of the input
    unet = StubUNet(dtype=torch.bfloat16)
    loss = diffusion_loss(unet, sched, latents, states, torch.Generator().manual_seed(7), timesteps=t)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))  # the loss's first draw
    noisy = sched.add_noise(latents, noise, t)
    assert unet.inputs[0][0].dtype == torch.bfloat16 and unet.inputs[0][2].dtype == torch.bfloat16
    assert torch.equal(unet.inputs[0][0], noisy.to(torch.bfloat16))  # fp32, cast once
    in_bf16 = sched.add_noise(latents.bfloat16(), noise.bfloat16(), t)  # what casting the latents first gave
    assert not torch.equal(unet.inputs[0][0], in_bf16)
    # The target stays fp32: a bf16 UNet predicting the noise exactly as bf16 can hold it still
    # pays for bf16's rounding (a bf16 target would make this loss 0); the loss itself is fp32.
    assert loss.dtype == torch.float32
    rounded = diffusion_loss(StubUNet(lambda *_: noise, dtype=torch.bfloat16), sched, latents, states,
                             torch.Generator().manual_seed(7), timesteps=t)
    assert rounded.item() == pytest.approx((noise.bfloat16().float() - noise).square().mean().item(), rel=1e-5)
    assert rounded.item() > 0


# --- the worker's forward/backward -------------------------------------------------------------


class StubVAE:
    config = SimpleNamespace(scaling_factor=0.5)

    def __init__(self):
        self.encoded = 0

    def to(self, device):
        return self

    def encode(self, pixels):
        self.encoded += len(pixels)
        mean = torch.nn.functional.avg_pool2d(pixels, 4).repeat(1, 2, 1, 1)[:, :SHAPE[1]]  # (B, 4, R/4, R/4)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))


class StubText:
    def __init__(self):
        self.captions: list[str] = []
        self.model = torch.nn.Identity()

    def encode(self, captions, device="cpu"):
        self.captions += captions
        return torch.tensor([[len(c)] * 8 for c in captions], dtype=torch.float32).unsqueeze(1) / 10


def run_forward_backward(unet_dtype: torch.dtype, overrides: list[str], seed: int = 0):
    cfg = config_from_dict({}, overrides)
    parts = SimpleNamespace(vae=StubVAE(), text=StubText(), unet=None,
                            noise_scheduler=build_noise_scheduler(cfg.model.scheduler))
    batch = Batch(pixels=torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8), captions=[f"caption {i}" for i in range(8)], keys=[])
    engine = StubUNet(dtype=unet_dtype)
    task = LatentDiffusionTask(cfg, parts, device=torch.device("cpu"))
    loss = task.loss(engine, batch, torch.Generator().manual_seed(seed))
    engine.backward(loss)
    loss = float(loss.detach())
    return engine, parts, loss


def test_forward_backward_noises_in_fp32_and_passes_the_options():
    fp32, _, _ = run_forward_backward(torch.float32, ["train.caption_dropout=0.5"])
    bf16, parts, loss = run_forward_backward(torch.bfloat16, ["train.caption_dropout=0.5"])
    # Same draws, so the same fp32 input: the bf16 UNet gets it cast once, never noised in bf16.
    assert torch.equal(bf16.inputs[0][0], fp32.inputs[0][0].to(torch.bfloat16))
    assert bf16.loss.dtype == torch.float32 and loss == bf16.loss.item()
    # Caption dropout: some captions reach the text encoder as "", the others unchanged.
    assert "" in parts.text.captions and any(c.startswith("caption") for c in parts.text.captions)
    # The train.* options reach the loss.
    _, _, weighted = run_forward_backward(torch.float32, ["train.snr_gamma=1.0"])
    _, _, plain = run_forward_backward(torch.float32, [])
    assert weighted != pytest.approx(plain, rel=1e-3)


# --- EMA ---------------------------------------------------------------------------------------


def tiny_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))


def train_step(module: torch.nn.Module, step: int) -> None:
    """A stand-in optimizer step: deterministic in `step`."""
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_ema_update_is_foreach_and_the_exponential_average():
    train = TrainConfig(ema=EMAConfig(decay=0.3))
    module = tiny_module().to(torch.bfloat16)  # as a bf16 engine's module: fp32 shadows over bf16 weights
    ema = build_ema(module, train)
    assert ema.foreach
    for step in range(1, 7):
        before = [s.clone() for s in ema.shadow_params]
        train_step(module, step)
        ema.step(module.parameters())
        decay = ema.cur_decay_value  # diffusers' warmup without use_ema_warmup, capped at train.ema.decay
        assert decay == (0.0 if step == 1 else min(step / (9 + step), 0.3))
        for s, old, p in zip(ema.shadow_params, before, module.parameters()):
            assert s.dtype == torch.float32
            torch.testing.assert_close(s, decay * old + (1 - decay) * p.float(), rtol=1e-6, atol=1e-6)


def test_ema_round_trips_through_a_checkpoint_and_resumes_identically(tmp_path):
    train = TrainConfig(ema=EMAConfig(decay=0.3))  # capped from step 4 on: saved before, resumed after
    module = tiny_module()
    ema = build_ema(module, train)
    for step in range(1, 4):
        train_step(module, step)
        ema.step(module.parameters())
    save_ema(tmp_path, ema)

    restored = build_ema(tiny_module(seed=1), train)  # a fresh worker: other weights, step 0
    load_ema(tmp_path, restored)
    saved, loaded = ema.state_dict(), restored.state_dict()
    assert {k: v for k, v in loaded.items() if k != "shadow_params"} == \
        {k: v for k, v in saved.items() if k != "shadow_params"}
    assert loaded["optimization_step"] == 3 and loaded["decay"] == 0.3
    assert all(torch.equal(a, b) for a, b in zip(saved["shadow_params"], loaded["shadow_params"]))
    assert restored.foreach

    for step in (4, 5):  # the same two training steps, uninterrupted and after the restore
        train_step(module, step)
        ema.step(module.parameters())
        restored.step(module.parameters())
    assert restored.optimization_step == ema.optimization_step == 5
    assert restored.cur_decay_value == ema.cur_decay_value == 0.3
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, restored.shadow_params))
