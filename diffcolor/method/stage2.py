"""Stage 2: in-context controllable colorization (DiffColor section 3.2, Imagic-style).

1. Rewrite the caption ``c`` into ``c'`` by putting an identifier token in
   front of each content word (:mod:`diffcolor.common.captions`) ("a dog on a bench" -> "a sks dog on a sks
   bench"). A later target that puts a colour word in an identifier's slot
   ("a brown dog on a sks bench") has the same token positions as ``c'``, so
   interpolating the two embeddings position by position is meaningful.
2. Optimise the text embedding ``e_opt`` of ``c'`` so that the frozen UNet
   reconstructs the aligned primary colourisation.
3. Fine-tune the UNet (a LoRA adapter by default) on the fixed ``e_opt`` to
   reconstruct it.

The result is the item's colour state (:mod:`diffcolor.method.state`): everything a
render needs without any further fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from diffcolor.common.captions import RewrittenCaption
from diffcolor.common.errors import PromptError
from diffcolor.method.diffusion import (
    check_prompt_fits,
    denoising_target,
    draw_noise_and_timesteps,
    encode_latent,
    encode_prompts,
    noise_scheduler,
    tokenize,
)
from diffcolor.method.models import Models
from diffcolor.method.performance import (
    PerformanceConfig,
    apply_memory_format,
    autocast_context,
    check_performance,
    make_adamw,
    maybe_compile,
)
from diffcolor.method.training import (
    AdapterConfig,
    CheckpointPolicy,
    CheckpointStore,
    LoopResult,
    learning_rate,
    make_trainable_unet,
    phase_generator,
    run_resumable_loop,
)


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2 hyper-parameters."""

    identifier: str = "sks"  # ours: a rare single token, as DreamBooth's; must tokenize to one token
    identifier_rule: str = "nouns"  # ours: which caption words get one (diffcolor.common.captions.IDENTIFIER_RULES)
    embed_steps: int = 500  # paper: 500 embedding-optimisation steps
    embed_learning_rate: float = 1e-3  # ours (Imagic uses 1e-3 on its embedding)
    finetune_steps: int = 1000  # paper: 1000 fine-tune steps
    finetune_learning_rate: float | None = None  # ours: AdamW; None: the adapter mode's default (training.DEFAULT_LEARNING_RATES)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # ours: LoRA by default
    timestep_range: tuple[int, int] = (0, 1000)  # ours: the full range, as a denoising loss normally uses
    max_grad_norm: float = 1.0  # ours
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)  # ours: speed only; CPU defaults = plain fp32


def check_token_alignment(models: Models, rewritten: RewrittenCaption, target: str) -> None:
    """Raises PromptError unless ``target`` differs from ``c'`` only in identifier slots, token for token.

    Both must fit the text encoder whole (a colour past its length would be
    cut off and the truncated prompts compare equal): PromptError names the
    words that would be lost.
    """
    check_prompt_fits(models, rewritten.text, "the caption with its identifiers", hide=rewritten.identifier)
    check_prompt_fits(models, target, "the target prompt", hide=rewritten.identifier)
    ids = tokenize(models, [rewritten.text, target])
    identifier = tokenize(models, [rewritten.identifier])[0]
    identifier_id = int(identifier[1])
    if int(identifier[2]) != models.tokenizer.eos_token_id:
        raise PromptError(f"identifier {rewritten.identifier!r} is not a single token for this tokenizer")
    differ = (ids[0] != ids[1]).nonzero().flatten().tolist()
    if any(int(ids[0][i]) != identifier_id for i in differ):
        raise PromptError(
            f"target {target!r} is not token-aligned with {rewritten.text!r}: "
            "each colour must be a single token placed in an identifier slot (e.g. 'red', not 'light red')"
        )


def fingerprint(models: Models, primary: torch.Tensor, rewritten: RewrittenCaption, config: Stage2Config, seed: int, phase: str) -> str:
    """Identifies an embedding optimisation or fine-tune: a checkpoint of another is never resumed."""
    digest = hashlib.sha256()
    digest.update(json.dumps([phase, asdict(config), rewritten.text, seed, models.model_hash], sort_keys=True, default=str).encode())
    digest.update(primary.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def reconstruction_losses(models: Models, unet, latent: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor,
                          timesteps: torch.Tensor, *, scheduler=None) -> dict[str, torch.Tensor]:
    """The denoising loss of both stage-2 loops for one noise draw (``scheduler`` built once by the loop, or here)."""
    scheduler = scheduler if scheduler is not None else noise_scheduler(models)
    noisy = scheduler.add_noise(latent, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=embedding).sample
    loss = F.mse_loss(prediction.float(), denoising_target(scheduler, latent, noise, timesteps).float())
    return {"total": loss, "diff": loss}


def reconstruction_step(models: Models, unet, latent: torch.Tensor, primary: torch.Tensor, embedding: torch.Tensor,
                        generator: torch.Generator, config: Stage2Config, scheduler) -> dict[str, torch.Tensor]:
    """One loop step: draw noise and timestep, (re-encode the primary when caching is off), the loss under autocast."""
    noise, timesteps = draw_noise_and_timesteps(latent, config.timestep_range, generator)
    if not config.performance.cache_latents:
        latent = encode_latent(models, primary)  # the naive baseline: same value, one VAE encode more per step
    with autocast_context(config.performance.autocast, models):
        return reconstruction_losses(models, unet, latent, embedding, noise, timesteps, scheduler=scheduler)


@dataclass
class Stage2Result:
    """The optimised embedding, the trained adapter and how the loops went."""

    embedding: torch.Tensor  # e_opt, (1, 77, D), CPU
    adapter: dict[str, torch.Tensor]  # trained tensors (LoRA or full UNet), CPU
    embed_loop: LoopResult
    finetune_loop: LoopResult


def _loop_options(phase: str, loop_fingerprint: str, config: Stage2Config, checkpoints: CheckpointStore | None,
                  progress: Callable[[str, int, dict], None] | None) -> dict:
    """The :func:`run_resumable_loop` options of one stage-2 loop: its checkpoint folder, fingerprint, policy, progress."""
    return {
        "checkpoints": None if checkpoints is None else checkpoints.child(phase),
        "fingerprint": loop_fingerprint,
        "policy": config.checkpoints,
        "max_grad_norm": config.max_grad_norm,
        "progress": None if progress is None else (lambda step, record: progress(phase, step, record)),
        "loss_every": config.performance.loss_every,
    }


def fit_in_context(
    models: Models,
    primary: torch.Tensor,
    rewritten: RewrittenCaption,
    config: Stage2Config = Stage2Config(),
    *,
    seed: int,
    checkpoints: CheckpointStore | None = None,
    progress: Callable[[str, int, dict], None] | None = None,
) -> Stage2Result:
    """Stage 2: optimises ``e_opt`` for ``c'`` and fine-tunes the UNet to reconstruct ``primary``.

    ``primary`` is the aligned primary colourisation, (1, 3, h, w) in [0, 1].
    ``checkpoints`` gets an ``embedding`` and a ``finetune`` folder (None: no
    checkpoints); ``progress(phase, step, losses)`` follows both loops.
    """
    performance = config.performance
    check_performance(performance, models)
    check_prompt_fits(models, rewritten.text, "the caption with its identifiers", hide=rewritten.identifier)
    # 1. Encode the aligned primary image and c' once (c' is only the embedding's start: never re-encoded);
    #    build the noise schedule once; put the convolutions in this device's fast layout.
    apply_memory_format([models.unet, models.vae], performance, models.device)
    scheduler = noise_scheduler(models)
    latent = encode_latent(models, primary)
    initial = encode_prompts(models, [rewritten.text]).float()

    def loop_options(phase: str) -> dict:
        return _loop_options(phase, fingerprint(models, primary, rewritten, config, seed, phase), config,
                             checkpoints, progress)

    # 2. Optimise the embedding of c' with the frozen UNet (the base, no adapter).
    embedding = torch.nn.Parameter(initial.clone())
    embed_generator = phase_generator(seed, "embedding")
    embed_optimizer = make_adamw([embedding], lr=config.embed_learning_rate, config=performance, device=models.device, weight_decay=0.0)
    base_unet = maybe_compile(models.unet, performance)
    embed_loop = run_resumable_loop(
        steps=config.embed_steps,
        step_fn=lambda _: reconstruction_step(models, base_unet, latent, primary, embedding, embed_generator, config, scheduler),
        parameters={"embedding": embedding},
        optimizer=embed_optimizer,
        generator=embed_generator,
        **loop_options("embedding"),
    )
    optimized = embedding.detach()

    # 3. Fine-tune the UNet on the fixed e_opt to reconstruct the primary image.
    tune_generator = phase_generator(seed, "finetune")
    trainable = make_trainable_unet(models.unet, config.adapter, name="diffcolor_stage2", generator=tune_generator)
    try:
        optimizer = make_adamw(trainable.parameters.values(), lr=learning_rate(config.adapter, config.finetune_learning_rate), config=performance, device=models.device)
        trainable.unet.train()
        tuned_unet = maybe_compile(trainable.unet, performance)
        finetune_loop = run_resumable_loop(
            steps=config.finetune_steps,
            step_fn=lambda _: reconstruction_step(models, tuned_unet, latent, primary, optimized, tune_generator, config, scheduler),
            parameters=trainable.parameters,
            optimizer=optimizer,
            generator=tune_generator,
            **loop_options("finetune"),
        )
        adapter = trainable.trained_state()
    finally:
        # 4. Leave the shared base UNet as it was loaded.
        trainable.release()
    return Stage2Result(embedding=optimized.cpu(), adapter=adapter, embed_loop=embed_loop, finetune_loop=finetune_loop)
