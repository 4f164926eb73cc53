"""What every fine-tune loop of the method shares: trainable UNets and resumable loops.

Two ways to make the UNet trainable (docs/DESIGN.md §3.2, §3.4): a LoRA adapter on the
attention projections (default; the base weights stay frozen and shared by
all items of a worker) or a full fine-tune of a private copy (the loaded base
is never modified either way).

:func:`run_resumable_loop` is the loop all three optimisations use (stage 1,
embedding optimisation, stage 2 fine-tune), following the checkpoint contract
of the diffusers training examples: every ``checkpoint_every`` steps it
publishes one safetensors object holding the trained tensors, the optimiser
state, the step, the RNG state and the loss history; a restarted loop resumes
from the newest checkpoint whose fingerprint matches, and older ones are
pruned. All randomness of a step must come from the loop's generator, so a
resumed loop ends bit-identical to an uninterrupted one on CPU. Where the
checkpoints live is the caller's: a :class:`CheckpointStore` of named byte
objects (the archive's ``CheckpointFolder`` under the item's prefix).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor.common.errors import StateError, UserError
from diffcolor.common.tensorfiles import DESCRIPTION_KEY, read_description

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # ours: attention projections, as diffusers' LoRA examples
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


@dataclass(frozen=True)
class AdapterConfig:
    """How a UNet is made trainable."""

    mode: str = "lora"  # "lora" (default, paper-compatible and light) or "full" (private copy of the UNet)
    rank: int = 8  # ours: LoRA rank
    alpha: float = 8.0  # ours: LoRA scale numerator (scale = alpha / rank)
    targets: tuple[str, ...] = LORA_TARGETS


# ours: AdamW learning rates of the UNet's trained tensors per adapter mode, when a config leaves it unset.
# A LoRA adapter starts at zero and takes diffusers' LoRA training examples' 1e-4; a full fine-tune moves SD's
# pretrained weights themselves and takes Imagic's 2e-6 (diffusers' Imagic pipeline): 50x smaller, since
# 1e-4 on the whole UNet destroys its prior within a few hundred steps.
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "full": 2e-6}


def learning_rate(adapter: AdapterConfig, configured: float | None) -> float:
    """The learning rate of a fine-tune: ``configured``, or the adapter mode's default when it is None.

    Raises ValueError for an unknown mode or a learning rate that is not positive.
    """
    if adapter.mode not in DEFAULT_LEARNING_RATES:
        raise UserError(f"adapter mode must be one of {sorted(DEFAULT_LEARNING_RATES)}, got {adapter.mode!r}")
    rate = DEFAULT_LEARNING_RATES[adapter.mode] if configured is None else float(configured)
    if not rate > 0:
        raise UserError(f"learning rate must be positive, got {configured!r}")
    return rate


@dataclass
class TrainableUNet:
    """A UNet ready to train and the tensors that train."""

    unet: torch.nn.Module
    parameters: dict[str, torch.nn.Parameter]
    adapter_name: str | None  # the LoRA adapter's name, None for a full fine-tune

    def release(self) -> None:
        """Removes the adapter from the shared base UNet (a full copy is simply dropped)."""
        if self.adapter_name is not None:
            self.unet.delete_adapters(self.adapter_name)
        for parameter in self.parameters.values():
            parameter.requires_grad_(False)
        self.unet.eval()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, detached, on CPU, keyed independently of the adapter's name."""
        return {
            _portable_key(key, self.adapter_name): parameter.detach().to("cpu", copy=True).contiguous()
            for key, parameter in self.parameters.items()
        }


def _portable_key(key: str, adapter_name: str | None) -> str:
    return key if adapter_name is None else key.replace(f".{adapter_name}.", ".adapter.")


# A stored LoRA tensor's key: the module path, the matrix, the portable adapter name (see _portable_key).
_STORED_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<matrix>lora_[AB])\.adapter\.weight$")


def peft_lora_key(stored_key: str) -> str:
    """The name peft gives a stored LoRA tensor outside the model: ``<module path>.lora_A.weight``.

    Stored keys carry the portable adapter name (``...to_q.lora_A.adapter.weight``);
    peft's ``get_peft_model_state_dict`` and diffusers' LoRA files name the
    tensor without it (diffusers then prefixes ``unet.``). Raises StateError
    for a key that is not a LoRA matrix of the stored form.
    """
    match = _STORED_LORA_KEY.match(stored_key)
    if match is None:
        raise StateError(f"stored adapter tensor {stored_key!r} is not a LoRA matrix ('<module>.lora_A.adapter.weight')")
    return f"{match['module']}.{match['matrix']}.weight"


def make_trainable_unet(base: torch.nn.Module, config: AdapterConfig, *, name: str, generator: torch.Generator) -> TrainableUNet:
    """Adds a fresh adapter named ``name`` to ``base`` (LoRA) or copies ``base`` (full).

    LoRA's A matrices are initialised from ``generator`` (B is zero, so the
    adapted UNet starts equal to the base), which keeps fits reproducible.
    """
    if config.mode == "full":
        # fp32 master weights: at fine-tune learning rates a bf16 weight would not move (diffcolor.method.performance).
        unet = copy.deepcopy(base).float()
        unet.requires_grad_(True)
        unet.train()
        return TrainableUNet(unet, dict(unet.named_parameters()), None)
    if config.mode != "lora":
        raise UserError(f"adapter mode must be 'lora' or 'full', got {config.mode!r}")
    from peft import LoraConfig

    if name in getattr(base, "peft_config", {}):
        base.delete_adapters(name)
    base.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets), init_lora_weights=True),
        adapter_name=name,
    )
    base.set_adapter(name)
    _keep_adapter_fp32(base, name)
    parameters = {key: value for key, value in base.named_parameters() if "lora_" in key and f".{name}." in key}
    for key, parameter in parameters.items():
        if "lora_A" in key:
            with torch.no_grad():
                cpu = torch.empty(parameter.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
                parameter.copy_(cpu)
        parameter.requires_grad_(True)
    return TrainableUNet(base, parameters, name)


def _keep_adapter_fp32(base: torch.nn.Module, name: str) -> None:
    """Keeps adapter ``name`` in fp32 master weights, also on a base whose weights are stored in bf16.

    peft gives a new adapter its base layer's dtype; at LoRA learning rates a
    bf16 adapter would not move (diffcolor.method.performance), so it trains in fp32
    and autocast casts it for the matrix products, as on an fp32 base. peft's
    cast of each LoRA input to the adapter's dtype is turned off (what
    ``peft.helpers.disable_input_dtype_casting`` does): in fp32 it is a no-op,
    and under autocast the bf16 input it would upcast is cast straight back
    for the matrix product, so it only costs an operator and a copy per layer
    (the step is bit-identical without it; tests/test_bench.py).
    """
    for module in base.modules():
        adapters = [getattr(module, key, None) for key in ("lora_A", "lora_B")]
        if not any(isinstance(layers, torch.nn.ModuleDict) and name in layers for layers in adapters):
            continue
        for layers in adapters:
            layers[name].float()
        module.cast_input_dtype_enabled = False


def load_trained_unet(base: torch.nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor], *, name: str) -> TrainableUNet:
    """A UNet carrying stored trained tensors (the inverse of :meth:`TrainableUNet.trained_state`)."""
    trainable = make_trainable_unet(base, config, name=name, generator=torch.Generator().manual_seed(0))
    keys = {key: _portable_key(key, trainable.adapter_name) for key in trainable.parameters}
    missing = set(keys.values()) - set(state)
    if missing:
        trainable.release()
        raise StateError(f"stored adapter lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
    with torch.no_grad():
        for key, parameter in trainable.parameters.items():
            parameter.copy_(state[keys[key]].to(parameter.device, parameter.dtype))
            parameter.requires_grad_(False)
    trainable.unet.eval()
    return trainable


# ---------------------------------------------------------------------------
# Checkpoints: one safetensors object per checkpoint, nothing pickled.


def _pack_checkpoint(step: int, parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, history: list[dict], fingerprint: str) -> bytes:
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().to("cpu").contiguous() for k, v in parameters.items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = generator.get_state()
    meta = {
        "step": step,
        "fingerprint": fingerprint,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "history": history,
    }
    return save_safetensors(tensors, metadata={DESCRIPTION_KEY: json.dumps(meta)})


def _unpack_checkpoint(data: bytes, parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                       generator: torch.Generator) -> tuple[int, list[dict]]:
    tensors = load_safetensors(data)
    meta = read_description(data)
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(tensors[f"param.{key}"].to(parameter.device, parameter.dtype))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    for index, slots in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _match_parameter_layouts(optimizer)
    generator.set_state(tensors["rng.generator"])
    return int(meta["step"]), list(meta["history"])


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Gives each restored moment buffer its parameter's memory layout (strides).

    Checkpoints store contiguous tensors. A parameter in channels_last (a full
    fine-tune copy of a channels_last UNet) with contiguous moments would make
    a fused optimiser, which walks all of them as flat memory, pair the wrong
    elements: the resumed fit would silently differ.
    """
    for parameter, slots in optimizer.state.items():
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                slots[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _read_fingerprint(data: bytes) -> str | None:
    try:
        return read_description(data)["fingerprint"]
    except (ValueError, KeyError):
        return None


class CheckpointStore(Protocol):
    """Named byte objects in one folder: where a loop publishes its checkpoints (``step-00000050.safetensors``).

    ``write`` must publish whole objects (a reader never sees part of one);
    ``child`` is the folder of one loop inside the item's checkpoint folder.
    """

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...

    def write(self, name: str, data: bytes) -> None: ...

    def remove(self, name: str) -> None: ...

    def child(self, name: str) -> "CheckpointStore": ...


@dataclass(frozen=True)
class CheckpointPolicy:
    """When loops checkpoint and how many checkpoints they keep."""

    every: int = 50  # ours: steps between checkpoints (a lost worker repeats at most this many)
    keep: int = 2  # ours: newest checkpoints kept per loop; older ones are pruned


@dataclass
class LoopResult:
    """What a finished loop reports."""

    history: list[dict] = field(default_factory=list)  # per step: the loss terms as floats
    steps_run: int = 0  # steps computed in this call (not restored from a checkpoint)
    resumed_from: int | None = None  # the checkpoint step this call resumed from


def run_resumable_loop(
    *,
    steps: int,
    step_fn: Callable[[int], dict[str, torch.Tensor]],
    parameters: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    checkpoints: CheckpointStore | None,
    fingerprint: str,
    policy: CheckpointPolicy = CheckpointPolicy(),
    max_grad_norm: float | None = 1.0,
    progress: Callable[[int, dict], None] | None = None,
    loss_every: int = 1,
) -> LoopResult:
    """Runs ``steps`` optimisation steps of ``step_fn``, resuming from the newest checkpoint.

    ``step_fn(step)`` returns a dict of scalar losses whose ``"total"`` is
    back-propagated; it must draw every random number from ``generator``.
    ``checkpoints`` is where the loop's checkpoints live (None: no
    checkpoints). Checkpoints with another ``fingerprint`` (another config or
    input) are ignored. ``progress(step, losses)`` is called once for each
    step, in order, before that step's checkpoint; whatever it raises stops
    the loop there.

    The losses stay on the device until they are read, all pending steps in
    one transfer, every ``loss_every`` steps, at each checkpoint step and at
    the last step: reading a device tensor waits for the device, so reading
    one every step would keep the host from queueing the next step's kernels
    while the device runs this one. The history, the checkpoints and the
    trained tensors are the same for any ``loss_every``; progress calls come
    in bursts of up to ``loss_every`` steps, so a progress callback that
    stops the loop stops it at most ``loss_every - 1`` steps after the step
    it saw (never after a checkpoint it did not see).
    """
    if isinstance(loss_every, bool) or not isinstance(loss_every, int) or loss_every < 1:
        raise ValueError(f"loss_every must be a positive integer, got {loss_every!r}")
    # 1. Resume from the newest matching checkpoint.
    result = LoopResult()
    start = 0
    if checkpoints is not None:
        for name in reversed(_checkpoint_names(checkpoints)):
            data = checkpoints.read(name)
            if _read_fingerprint(data) != fingerprint:
                continue
            start, result.history = _unpack_checkpoint(data, parameters, optimizer, generator)
            result.resumed_from = start
            break

    # 2. Optimise.
    trainable = [p for p in parameters.values() if p.requires_grad]
    pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # steps whose losses are still on the device
    for step in range(start + 1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        losses = step_fn(step)
        losses["total"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        pending.append((step, {key: value.detach() for key, value in losses.items()}))
        result.steps_run += 1
        checkpoint_now = checkpoints is not None and (step % policy.every == 0 or step == steps)
        if checkpoint_now or step % loss_every == 0 or step == steps:
            _read_losses(pending, result.history, progress)

        # 3. Checkpoint every K steps and at the end (a restart after the loop
        #    then runs no step), and prune the old ones.
        if checkpoint_now:
            data = _pack_checkpoint(step, parameters, optimizer, generator, result.history, fingerprint)
            checkpoints.write(f"step-{step:08d}.safetensors", data)
            existing = _checkpoint_names(checkpoints)
            for old in existing[: max(0, len(existing) - policy.keep)]:
                checkpoints.remove(old)
    optimizer.zero_grad(set_to_none=True)
    return result


def _read_losses(pending: list[tuple[int, dict[str, torch.Tensor]]], history: list[dict],
                 progress: Callable[[int, dict], None] | None) -> None:
    """Moves the pending steps' losses to the host in one transfer, into ``history`` and ``progress``; empties ``pending``."""
    if not pending:
        return
    keys = [list(losses) for _, losses in pending]
    values = torch.stack([value.float().reshape(()) for _, losses in pending for value in losses.values()]).cpu().tolist()
    position = 0
    steps = [step for step, _ in pending]
    pending.clear()
    for step, names in zip(steps, keys):
        record = dict(zip(names, values[position : position + len(names)]))
        position += len(names)
        history.append(record)
        if progress is not None:
            progress(step, record)


def _checkpoint_names(checkpoints: CheckpointStore) -> list[str]:
    """The loop's checkpoint names, oldest first (the step number is zero-padded)."""
    return sorted(name for name in checkpoints.names() if _CHECKPOINT_NAME.match(name))


def clear_checkpoints(checkpoints: CheckpointStore) -> None:
    """Removes a loop's checkpoints once its result is safely stored."""
    for name in _checkpoint_names(checkpoints):
        checkpoints.remove(name)


def phase_generator(seed: int, phase: str) -> torch.Generator:
    """A CPU generator for one phase of an item, derived from the item's seed.

    Each phase (stage 1, primary sampling, embedding, fine-tune, each render)
    has its own stream, so changing one phase's step count never shifts
    another phase's random numbers.
    """
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{phase}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
