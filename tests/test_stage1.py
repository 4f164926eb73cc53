"""Stage 1: every loss term trains, and only what is meant to train changes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gray_scene

from diffcolor.method.diffusion import draw_noise_and_timesteps
from diffcolor.method.stage1 import (
    Stage1Config,
    contrastive_loss,
    fit_color_prior,
    prepare_inputs,
    stage1_losses,
)
from diffcolor.method.training import (
    AdapterConfig,
    make_trainable_unet,
    phase_generator,
)


def _gray(height=64, width=64):
    return torch.from_numpy(gray_scene(height, width)).float()[None, None]


def _snapshot(*modules):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _unchanged(before, *modules):
    return all(
        before_state.keys() == module.state_dict().keys()
        and all(torch.equal(before_state[k], v) for k, v in module.state_dict().items())
        for before_state, module in zip(before, modules)
    )


@pytest.mark.parametrize("seed", range(5))
def test_contrastive_loss_matches_the_formula(seed):
    # float64, so the check is of the formula and not of fp32 rounding (a loss near 0 has a large relative error).
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(1, 8, generator=generator, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator, dtype=torch.float64), dim=-1)
    tau = 0.07
    s = [float(v) for v in (image @ texts.T)[0]]
    expected = -math.log(math.exp(s[0] / tau) / sum(math.exp(v / tau) for v in s))
    assert float(contrastive_loss(image, texts, tau)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("term, weights", [
    ("con", dict(w_con=1.0, l_lum=0.0, l_diff=0.0)),
    ("lum", dict(w_con=0.0, l_lum=1.0, l_diff=0.0)),
    ("diff", dict(w_con=0.0, l_lum=0.0, l_diff=1.0)),
])
def test_each_loss_term_goes_down_over_a_short_fit(models, term, weights):
    config = Stage1Config(learning_rate=2e-2, timestep_range=(300, 400), **weights)
    inputs = prepare_inputs(models, _gray(), "a dog sitting on a wooden bench", config)
    generator = phase_generator(0, "test")
    trainable = make_trainable_unet(models.unet, config.adapter, name="test_terms", generator=generator)
    try:
        optimizer = torch.optim.AdamW(trainable.parameters.values(), lr=config.learning_rate)
        probes = [draw_noise_and_timesteps(inputs.latent, config.timestep_range, torch.Generator().manual_seed(i)) for i in range(4)]

        def probe_loss():
            with torch.no_grad():
                return sum(float(stage1_losses(models, trainable.unet, inputs, n, t, config)[term]) for n, t in probes) / len(probes)

        before = probe_loss()
        for _ in range(30):
            optimizer.zero_grad()
            noise, timesteps = draw_noise_and_timesteps(inputs.latent, config.timestep_range, generator)
            stage1_losses(models, trainable.unet, inputs, noise, timesteps, config)["total"].backward()
            optimizer.step()
        after = probe_loss()
    finally:
        trainable.release()
    assert after < 0.95 * before, (term, before, after)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fit_trains_only_its_adapter_and_leaves_base_weights_untouched(models, smoke, mode):
    from dataclasses import replace

    config = replace(smoke.stage1, adapter=AdapterConfig(mode=mode), steps=3)
    before = _snapshot(models.unet, models.vae, models.text_encoder, models.clip)
    trained = {}

    def capture(step, record):
        trained["step"] = step

    result = fit_color_prior(models, _gray(64, 48), "a dog on a bench", config, seed=1, progress=capture)
    assert trained["step"] == 3 and result.loop.steps_run == 3
    assert result.primary.shape == (1, 3, 64, 48)
    assert float(result.primary.min()) >= 0.0 and float(result.primary.max()) <= 1.0
    assert _unchanged(before, models.unet, models.vae, models.text_encoder, models.clip)
    assert not getattr(models.unet, "peft_config", {}), "the stage-1 adapter must be removed after the fit"


def test_lora_adapter_is_the_only_trainable_part(models):
    trainable = make_trainable_unet(models.unet, AdapterConfig(), name="test_only", generator=torch.Generator().manual_seed(0))
    try:
        names = {name for name, p in models.unet.named_parameters() if p.requires_grad}
        assert names == set(trainable.parameters) and names
        assert all("lora_" in name for name in names)
    finally:
        trainable.release()
    assert not any(p.requires_grad for p in models.unet.parameters())


def test_losses_read_every_n_steps_give_the_same_fit_progress_and_checkpoints(models, smoke, tmp_path, monkeypatch):
    """Reading the losses every 4 steps (one device sync per 4) changes nothing a fit produces, on a CPU."""
    from dataclasses import replace

    import diffcolor.method.training as training
    from diffcolor.archive.items import CheckpointFolder

    reads = []
    real_read = training._read_losses
    monkeypatch.setattr(training, "_read_losses", lambda pending, *rest: (reads.append(len(pending)),
                                                                            real_read(pending, *rest)))
    runs = {}
    for every in (1, 4):
        config = replace(smoke.stage1, steps=10, checkpoints=training.CheckpointPolicy(every=6, keep=5),
                         performance=replace(smoke.stage1.performance, loss_every=every))
        seen = []
        folder = CheckpointFolder(str(tmp_path / f"every-{every}"))
        reads.clear()
        result = fit_color_prior(models, _gray(), "a dog on a bench", config, seed=3, checkpoints=folder,
                                 progress=lambda step, record: seen.append((step, record)))
        runs[every] = (result, seen, {name: folder.read(name) for name in folder.names()}, list(reads))
    (one, seen_one, saved_one, reads_one), (four, seen_four, saved_four, reads_four) = runs[1], runs[4]
    # Read at steps 4, 6 (a checkpoint: its history is complete), 8 and 10 (the last), not at every step.
    assert reads_one == [1] * 10 and reads_four == [4, 2, 2, 2]
    assert torch.equal(one.primary, four.primary)
    assert one.loop.history == four.loop.history and len(four.loop.history) == 10
    assert seen_one == seen_four and [step for step, _ in seen_four] == list(range(1, 11))
    assert saved_one.keys() == saved_four.keys() == {"step-00000006.safetensors", "step-00000010.safetensors"}
    for name in saved_one:  # same tensors, optimiser state, RNG state and history (the fingerprint names the config)
        from safetensors.torch import load as load_tensors

        from diffcolor.common.tensorfiles import read_description

        a, b = load_tensors(saved_one[name]), load_tensors(saved_four[name])
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert read_description(saved_one[name])["history"] == read_description(saved_four[name])["history"]


def test_loss_every_must_be_a_positive_integer():
    from diffcolor.method.training import run_resumable_loop

    weight = torch.nn.Parameter(torch.zeros(2))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="loss_every must be a positive integer"):
            run_resumable_loop(steps=1, step_fn=lambda _: {"total": weight.sum()}, parameters={"w": weight},
                               optimizer=torch.optim.SGD([weight], lr=0.1), generator=torch.Generator(),
                               checkpoints=None, fingerprint="x", loss_every=bad)


def test_the_reduced_loss_decode_decodes_smaller_and_changes_nothing_when_off(models, smoke, monkeypatch):
    """stage1.loss_decode_side: the losses decode the x0 estimate at about that side; None or a side at or above
    the working size decode it as before, bit for bit."""
    from dataclasses import replace

    import diffcolor.method.stage1 as stage1
    from diffcolor.method.stage1 import loss_latent

    latent = torch.randn(1, 4, 8, 6)
    assert loss_latent(latent, None, 8) is latent and loss_latent(latent, 48, 8) is latent  # 48 px = 6 cells: as is
    assert loss_latent(latent, 24, 8).shape[-2:] == (4, 3)  # short side 3 cells = 24 px, aspect kept

    decoded_sizes = []
    real_decode = stage1.decode_latent
    monkeypatch.setattr(stage1, "decode_latent", lambda m, x: (decoded_sizes.append(tuple(x.shape[-2:])),
                                                               real_decode(m, x))[1])
    gray = _gray(64, 48)
    noise, timesteps = draw_noise_and_timesteps(torch.zeros(1, 4, 8, 6), (300, 400), torch.Generator().manual_seed(0))
    losses = {}
    for side in (None, 64, 24):
        config = replace(smoke.stage1, loss_decode_side=side)
        inputs = prepare_inputs(models, gray, "a dog on a bench", config)
        trainable = make_trainable_unet(models.unet, config.adapter, name="test_decode",
                                        generator=torch.Generator().manual_seed(1))
        try:
            result = stage1_losses(models, trainable.unet, inputs, noise, timesteps, config)
            result["total"].backward()  # differentiable through the resize
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters.values())
            losses[side] = {key: float(value.detach()) for key, value in result.items()}
        finally:
            trainable.release()
    assert decoded_sizes == [(8, 6), (8, 6), (4, 3)]
    assert losses[None] == losses[64] and losses[24] != losses[None]
    with pytest.raises(ValueError, match="loss_decode_side must be null or a whole number of pixels"):
        fit_color_prior(models, gray, "a dog", replace(smoke.stage1, loss_decode_side=4), seed=0)
