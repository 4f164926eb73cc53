"""Quality evaluation on a ground-truth set: the paper's metrics per item and per run.

An eval manifest is an ordinary manifest (``manifests/README.md``) whose rows
carry ``ground_truth_uri``, a colour photograph. For each such row:

1. the ground truth is read like any source (:func:`diffcolor.archive.images.read_image`:
   format allowlist, EXIF orientation, ICC to sRGB) and converted to gray keeping
   the CIE L* of every pixel (the conversion the pipeline itself applies to
   colour inputs); the gray is written under ``OUTPUT/eval/inputs/``, never
   beside the ground truth. The row's ``image_uri`` is not read;
2. the gray is colourised through the normal pipeline
   (:func:`diffcolor.pipeline.colorize_item`) with the row's caption, targets,
   colour map and seed; an item already done with the same cache key is reused;
3. every version produced is compared with the ground truth.

Metrics (the paper reports FID, LPIPS, CLIP score, PSNR and SSIM):

- ``psnr_rgb``, ``ssim_rgb``: on sRGB in [0, 1]; PSNR by torchmetrics, SSIM by
  scikit-image with Wang et al.'s (2004) settings (Gaussian window, sigma 1.5,
  border half-window left out);
- ``psnr_chroma``, ``ssim_chroma``: the same on the CIELAB a* and b* channels
  (data range 256, ours). The output keeps the gray's L*, so every difference
  from the ground truth is a chroma difference: these isolate it;
- ``colorfulness`` and ``colorfulness_ground_truth`` (Hasler and Suesstrunk,
  :func:`diffcolor.method.metrics.colorfulness`) and their difference ``colorfulness_gap``;
- ``clip_score`` (output vs its prompt, as in the item's record) and
  ``clip_score_ground_truth`` (ground truth vs the same prompt), with the
  configured CLIP model;
- ``lpips`` (torchmetrics' LPIPS network, AlexNet backbone) and, per run, ``fid``
  (torchmetrics' FID statistics over torch-fidelity's InceptionV3 pool3
  features): only when the operator supplies the feature networks' weight files
  (:class:`PerceptualWeights`). Nothing is downloaded; without a file the metric
  is recorded as missing with a one-line message naming the file, and the rest
  of the eval completes.

Layout under the output root (any storage URI)::

    OUTPUT/eval/inputs/ITEM.png                 gray input derived from the ground truth
    OUTPUT/eval/items/ITEM/...                  the item layout of diffcolor.archive.items
    OUTPUT/eval/rows/ITEM/v0001.json            cached metric row of a version
    OUTPUT/eval/features/ITEM/v0001.safetensors Inception features of output and ground truth (FID)
    OUTPUT/eval/eval.parquet                    one row per evaluated version (and per failure)
    OUTPUT/eval/summary.json                    aggregates, FID, missing-metric messages
    OUTPUT/eval/report.html                     thumbnails, metrics and plots; opens offline
    OUTPUT/eval/plots/*.png                     the report's plots

A metric row is cached under a key of the output's sha256, the ground truth's
sha256, the prompt, the eval configuration, the CLIP model and the perceptual
weight files, so an eval rerun recomputes nothing that has not changed.

:mod:`diffcolor.tools.eval_report` draws the report, the plots and the terminal
summaries, and compares two evals (``diffcolor eval-compare``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from diffcolor import __version__
from diffcolor.archive import storage
from diffcolor.archive.images import SourceImage, read_image
from diffcolor.archive.layout import EvalLayout, ItemLayout, OutputLayout, eval_table_candidates, summary_beside
from diffcolor.archive.report import summarise
from diffcolor.common.errors import DiffColorError, PermanentError, UserError
from diffcolor.common.items import ItemRequest
from diffcolor.common.keys import hash_json, sha256_hex
from diffcolor.common.pixels import unit_rgb
from diffcolor.common.tensorfiles import read_metadata
from diffcolor.method.color import rgb_to_lab
from diffcolor.method.diffusion import clip_score
from diffcolor.method.metrics import colorfulness
from diffcolor.method.models import Models
from diffcolor.method.presets import PipelineConfig
from diffcolor.pipeline import colorize_item
from diffcolor.tools.eval_metrics import METRICS

EVAL_FORMAT = 1  # bump when a metric's definition changes: every cached row is then recomputed

# How the ground truth becomes the gray input (recorded in every row).
GRAY_METHOD = "cie_lstar"
GRAY_METHOD_TEXT = (
    "neutral gray with the CIE L* (D65) of each ground-truth pixel, after ICC conversion to sRGB "
    "(diffcolor.archive.images, the pipeline's own gray), written as a PNG at the ground truth's bit depth"
)

# The weight files the perceptual metrics take, as their publishers name them:
# the name ends in the first 8 hex digits of the file's sha256 (torch.hub's convention).
LPIPS_BACKBONE_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}
FID_WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHT_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

Progress = Callable[[dict], None]  # called with each eval row as it is ready


@dataclass(frozen=True)
class EvalConfig:
    """How outputs are compared with their ground truth (part of every cached row's key)."""

    # Long side, in pixels, at which PSNR, SSIM, LPIPS and the FID features are
    # computed (both images resized alike, antialiased); None: full resolution.
    # Ours: bounds memory on archival scans and keeps numbers comparable across
    # scan sizes. Colourfulness and CLIP score always use the full image.
    max_side: int | None = 1024
    # SSIM: Gaussian weights of sigma 1.5 (Wang et al. 2004), truncated at 3.5 sigma
    # by scikit-image (an 11 px window); images smaller than the window get NaN.
    ssim_sigma: float = 1.5
    # Data range of the a*, b* channels for chroma PSNR/SSIM: the span of 8-bit
    # Lab encodings, a*, b* in [-128, 128) (ours; the paper does not report chroma-only numbers).
    chroma_data_range: float = 256.0
    # LPIPS backbone: "alex" (Zhang et al. 2018 recommend it as a forward metric), "vgg" or "squeeze".
    lpips_net: str = "alex"
    # FID features: InceptionV3 pool3, 2048-d (Heusel et al. 2017).
    fid_features: int = 2048

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PerceptualWeights:
    """Operator-supplied weight files of the LPIPS and FID feature networks (local paths or URIs).

    Each is a file, or a folder holding the file under its published name
    (:data:`LPIPS_BACKBONE_FILES`, :data:`FID_WEIGHT_FILES`). None: the metric is
    not computed (nothing is ever downloaded).
    """

    lpips: str | None = None
    fid: str | None = None


@dataclass
class PerceptualNets:
    """The loaded LPIPS and FID networks, or why each is missing."""

    lpips: torch.nn.Module | None = None
    fid: torch.nn.Module | None = None
    missing: dict[str, str] = field(default_factory=dict)  # metric -> one-line message
    weights_sha256: dict[str, str | None] = field(default_factory=lambda: {"lpips": None, "fid": None})


@dataclass
class EvalRun:
    """What :func:`evaluate_manifest` produced."""

    rows: list[dict]
    summary: dict
    uris: dict[str, str]


class EvalError(PermanentError):
    """An eval that cannot start: no ground truth in the manifest, unreadable eval tables."""

    error_class = "bad_eval"


def eval_prefix(output: str) -> str:
    """Where an eval's objects live under an output root."""
    return OutputLayout(output).eval.prefix


# ---------------------------------------------------------------------------
# Image comparison: PSNR, SSIM (RGB and chroma), LPIPS, colourfulness.


def _as_tensor(rgb: np.ndarray, max_side: int | None) -> torch.Tensor:
    """(1, 3, h, w) float64, resized (antialiased bilinear) so the long side is at most ``max_side``."""
    tensor = torch.from_numpy(np.ascontiguousarray(unit_rgb(rgb, check_range=False))).permute(2, 0, 1)[None]
    height, width = tensor.shape[-2:]
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)
    return tensor


def compare_images(output: np.ndarray, ground_truth: np.ndarray, config: EvalConfig = EvalConfig(),
                   lpips: torch.nn.Module | None = None) -> dict[str, float]:
    """PSNR and SSIM on RGB and on the chroma channels, colourfulness of both, and LPIPS when given.

    Args:
        output: (H, W, 3) uint8, uint16 or float in [0, 1], the colourised image.
        ground_truth: the same shape, the colour original.
        config: sizes and windows.
        lpips: a network from :func:`load_perceptual_nets`, or None (``lpips`` is then NaN).

    Returns:
        ``psnr_rgb``, ``ssim_rgb``, ``psnr_chroma``, ``ssim_chroma`` (PSNR is
        ``inf`` for identical images; SSIM NaN for images smaller than the
        window), ``colorfulness``, ``colorfulness_ground_truth``,
        ``colorfulness_gap`` and ``lpips``.

    Raises:
        ValueError: when the shapes differ or an image is not (H, W, 3).
    """
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import peak_signal_noise_ratio

    # 1. Check inputs.
    if output.ndim != 3 or output.shape[2] != 3 or output.shape != ground_truth.shape:
        raise ValueError(f"output {output.shape} and ground truth {ground_truth.shape} must be the same (H, W, 3) size")

    # 2. Colourfulness on the full images.
    values = {"colorfulness": colorfulness(unit_rgb(output)), "colorfulness_ground_truth": colorfulness(unit_rgb(ground_truth))}
    values["colorfulness_gap"] = values["colorfulness"] - values["colorfulness_ground_truth"]

    # 3. RGB and chroma (CIELAB a*, b*) at the eval size.
    #    float32, as torchmetrics computes by default (float64 changes PSNR by under 1e-5 dB).
    predicted, target = _as_tensor(output, config.max_side).float(), _as_tensor(ground_truth, config.max_side).float()
    chroma_predicted, chroma_target = rgb_to_lab(predicted)[:, 1:], rgb_to_lab(target)[:, 1:]
    values["psnr_rgb"] = float(peak_signal_noise_ratio(predicted, target, data_range=1.0))
    values["psnr_chroma"] = float(peak_signal_noise_ratio(chroma_predicted, chroma_target, data_range=config.chroma_data_range))
    #    SSIM: scikit-image with Wang et al.'s settings (Gaussian sigma 1.5, population
    #    covariances), averaged over the image less half a window at the border as their
    #    reference code does (torchmetrics averages reflect-padded borders in too).
    def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
        if min(a.shape[-2:]) < 2 * int(3.5 * config.ssim_sigma + 0.5) + 1:
            return float("nan")
        return float(structural_similarity(
            b[0].permute(1, 2, 0).double().numpy(), a[0].permute(1, 2, 0).double().numpy(), data_range=data_range,
            channel_axis=-1, gaussian_weights=True, sigma=config.ssim_sigma, use_sample_covariance=False))

    values["ssim_rgb"] = ssim(predicted, target, 1.0)
    values["ssim_chroma"] = ssim(chroma_predicted, chroma_target, config.chroma_data_range)

    # 4. LPIPS (inputs in [0, 1], normalised to [-1, 1] by the network).
    values["lpips"] = float("nan")
    if lpips is not None:
        with torch.no_grad():
            values["lpips"] = float(lpips(predicted, target, normalize=True).reshape(-1)[0])
    return values


def inception_features(fid_network: torch.nn.Module, rgb: np.ndarray, config: EvalConfig = EvalConfig()) -> torch.Tensor:
    """(D,) float32 InceptionV3 features of an image (uint8 input, resized to 299 by the network)."""
    tensor = _as_tensor(rgb, config.max_side)
    as_bytes = torch.round(tensor * 255.0).to(torch.uint8)
    with torch.no_grad():
        features = fid_network(as_bytes)
    features = features[0] if isinstance(features, (tuple, list)) else features
    return features.reshape(-1).float().cpu()


class _PrecomputedFeatures(torch.nn.Module):
    """Feeds stored feature vectors to torchmetrics' FID statistics unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Frechet distance of the Gaussians fitted to two feature sets (torchmetrics' FID statistics).

    Args:
        real: (N, D) features of the ground truths; generated: (M, D) of the outputs; N, M >= 2.

    Returns:
        ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` with unbiased
        covariances, as torchmetrics' FrechetInceptionDistance computes it.

    Raises:
        ValueError: fewer than two samples in a set, or different feature sizes.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(generated.shape)}")
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(real)} and {len(generated)}")
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), normalize=False)
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


# ---------------------------------------------------------------------------
# The perceptual networks: library code, operator-supplied weight files.


def _read_weight_file(location: str, names: tuple[str, ...]) -> tuple[str, bytes] | None:
    """(uri, bytes) of ``location/NAME`` for the first published name present, else of ``location`` itself
    when it is a file; None when neither is there."""
    for name in names:
        candidate = storage.join(location, name)
        if storage.exists(candidate):
            return candidate, storage.read_bytes(candidate)
    if storage.exists(location):
        try:
            return location, storage.read_bytes(location)
        except DiffColorError:  # a folder without the file
            return None
    return None


def _read_weights(what: str, option: str, location: str | None, names: tuple[str, ...], url: str) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, sha256, None) of the weight file, or (None, None, message) saying which file is missing."""
    name = names[0]
    if not location:
        return None, None, (f"{what} not computed: no weight file given; pass {option} PATH to {name} "
                            f"(download it once from {url} and copy it to this machine)")
    found = _read_weight_file(location, names)
    if found is None:
        return None, None, (f"{what} not computed: {option} {location}: file not found (expected {' or '.join(names)}; "
                            f"download it once from {url})")
    uri, data = found
    digest = sha256_hex(data)
    expected = name.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        return None, None, (f"{what} not computed: {uri} is not {name}: its sha256 starts {digest[:8]}, "
                            f"expected {expected} (download it again from {url})")
    return data, digest, None


def _safe_state_dict(data: bytes, uri_hint: str) -> dict:
    """The file's state dict, unpickled with ``weights_only`` (tensors and containers only, no code)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{uri_hint}: not a plain PyTorch state dict ({type(error).__name__}: {error})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_lpips_network(data: bytes, net: str = "alex") -> torch.nn.Module:
    """torchmetrics' LPIPS network with the backbone weights of ``data`` (torchvision's file).

    The linear calibration layers are the ones torchmetrics ships (Zhang et al.'s
    v0.1); the backbone is built by torchmetrics from torchvision with random
    weights, then given the operator's ImageNet weights (torchvision's
    ``features.N.*`` keys map one to one onto torchmetrics' ``sliceK.N.*``).

    Raises:
        ImportError: torchmetrics' LPIPS or torchvision cannot be imported.
        ValueError: the file is not a state dict with every backbone key.
    """
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    network = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
    state = _safe_state_dict(data, "LPIPS weights")
    backbone = network.net
    mapped, absent = {}, []
    for key in backbone.state_dict():
        source = "features." + key.split(".", 1)[1]
        if source in state:
            mapped[key] = state[source]
        else:
            absent.append(source)
    if absent:
        raise UserError(f"the LPIPS backbone file lacks {len(absent)} of the {net} keys, e.g. {absent[0]!r}")
    backbone.load_state_dict(mapped, strict=True)
    return network.eval()


def load_fid_network(data: bytes, features: int = 2048) -> torch.nn.Module:
    """torchmetrics' InceptionV3 (torch-fidelity's network) with the weights of ``data``.

    The bytes are first unpickled with ``weights_only`` (tensors only); only
    then are they handed to torch-fidelity, which loads them itself.

    Raises:
        ImportError: torch-fidelity (or its torchvision) cannot be imported.
        ValueError: the file is not a plain state dict.
    """
    _safe_state_dict(data, "FID weights")
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError("torch-fidelity is not installed")
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                              feature_extractor_weights_path=io.BytesIO(data)).eval()


def load_perceptual_nets(weights: PerceptualWeights, config: EvalConfig = EvalConfig(), device: torch.device | str = "cpu") -> PerceptualNets:
    """Loads the LPIPS and FID networks from the operator's files; records a message for each that cannot be.

    Never downloads and never raises for a missing file, package or bad file: the
    metric is then missing and ``missing[metric]`` says why in one line.
    """
    nets = PerceptualNets()
    lpips_name, lpips_url = LPIPS_BACKBONE_FILES[config.lpips_net]
    data, digest, message = _read_weights("LPIPS", "--lpips-weights", weights.lpips, (lpips_name,), lpips_url)
    if data is not None:
        try:
            nets.lpips = load_lpips_network(data, config.lpips_net).to(device)
            nets.weights_sha256["lpips"] = digest
        except (ImportError, RuntimeError, ValueError) as error:
            message = (f"LPIPS not computed: its network needs torchmetrics and torchvision (the build that matches "
                       f"your torch: pip install torchvision): {type(error).__name__}: {str(error).splitlines()[0]}")
    if message:
        nets.missing["lpips"] = message
    data, digest, message = _read_weights("FID", "--fid-weights", weights.fid, FID_WEIGHT_FILES, FID_WEIGHT_URL)
    if data is not None:
        try:
            nets.fid = load_fid_network(data, config.fid_features).to(device)
            nets.weights_sha256["fid"] = digest
        except (ImportError, RuntimeError, ValueError) as error:
            message = (f"FID not computed: its network needs torch-fidelity (pip install torch-fidelity, with the "
                       f"torchvision that matches your torch): {type(error).__name__}: {str(error).splitlines()[0]}")
    if message:
        nets.missing["fid"] = message
    return nets


# ---------------------------------------------------------------------------
# One item: ground truth -> gray -> pipeline -> metrics.


def gray_png(source: SourceImage) -> bytes:
    """The L*-preserving gray of a colour image as a PNG at its bit depth (8 or 16)."""
    if source.bit_depth == 16:
        picture = Image.fromarray(np.round(source.gray * 65535.0).astype(np.uint16))
    else:
        picture = Image.fromarray(np.round(source.gray * 255.0).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(uri: str, data: bytes) -> None:
    if storage.exists(uri) and storage.read_bytes(uri) == data:
        return
    storage.write_bytes(uri, data)


def _versions_of(layout: ItemLayout, key: str) -> list[dict]:
    """The item's version records made with cache key ``key``, oldest first."""
    records = [storage.read_json(uri) for uri in storage.list_files(layout.versions) if uri.endswith(".json")]
    return [r for r in records if r.get("cache_key") == key and r.get("status") == "done"]


def _read_master(uri: str) -> np.ndarray:
    """The archival master's pixels exactly as written (uint8 or uint16), no colour management."""
    return tifffile.imread(io.BytesIO(storage.read_bytes(uri)))


def _row_uri(prefix: str, item_id: str, version: int) -> str:
    return EvalLayout(prefix).row(item_id, version)


def _features_uri(prefix: str, item_id: str, version: int) -> str:
    return EvalLayout(prefix).features(item_id, version)


def _base_row(request: ItemRequest, ground_truth_uri: str | None) -> dict:
    return {
        "item_id": request.item_id, "version": None, "status": None, "error_class": None, "error_message": None,
        "caption": request.caption, "ground_truth_uri": ground_truth_uri, "manifest_image_uri": request.source_uri,
        "gray_method": GRAY_METHOD, "eval_format": EVAL_FORMAT, "software_version": __version__,
        **{name: None for name in METRICS},
    }


def _failed_row(request: ItemRequest, ground_truth_uri: str | None, error: Exception, status: str = "failed") -> dict:
    row = _base_row(request, ground_truth_uri)
    row.update(status=status, error_class=getattr(error, "error_class", type(error).__name__), error_message=str(error))
    return row


def evaluate_item(
    models: Models,
    request: ItemRequest,
    output: str,
    config: PipelineConfig,
    nets: PerceptualNets,
    *,
    preset: str = "",
    eval_config: EvalConfig = EvalConfig(),
) -> list[dict]:
    """Evaluates one manifest row; returns one row per version produced (or one failure row).

    The row's ``catalogue["ground_truth_uri"]`` names the colour original. A
    version whose metric row is cached under the same key is not recomputed
    (``reused`` is then True). Item errors (unreadable ground truth, a failed
    colourisation) give a ``failed`` row, never an exception.
    """
    prefix = eval_prefix(output)
    ground_truth_uri = (request.catalogue or {}).get("ground_truth_uri")
    if not ground_truth_uri:
        return [_failed_row(request, None, EvalError("the row has no ground_truth_uri"), status="no_ground_truth")]
    try:
        # 1. The ground truth, and its L*-preserving gray written under OUTPUT/eval/inputs/.
        truth_bytes = storage.read_bytes(ground_truth_uri)
        truth = read_image(truth_bytes, ground_truth_uri)
        if truth.rgb is None or truth.tone == "gray":
            raise EvalError(f"ground truth '{ground_truth_uri}' is a gray image; an eval needs colour originals")
        gray_uri = EvalLayout(prefix).input(request.item_id)
        gray_bytes = gray_png(truth)
        _write_if_changed(gray_uri, gray_bytes)

        # 2. Colourise the gray through the normal pipeline (reused when done with the same key).
        item = dataclasses.replace(request, source_uri=gray_uri, force=False)
        layout = EvalLayout(prefix).items.item(request.item_id)
        records = colorize_item(models, item, layout.prefix, config, preset=preset)
        if records and records[0]["status"] == "skipped_done":
            records = [dict(r, status="skipped_done") for r in _versions_of(layout, records[0]["cache_key"])] or records
    except DiffColorError as error:
        return [_failed_row(request, ground_truth_uri, error)]
    if records[0]["status"] not in ("done", "skipped_done"):
        first = records[0]
        row = _base_row(request, ground_truth_uri)
        row.update(status=first["status"], error_class=first.get("error_class"), error_message=first.get("error_message"))
        return [row]

    # 3. Compare each version with the ground truth (or reuse its cached row).
    truth_sha = sha256_hex(truth_bytes)
    common = {"ground_truth_sha256": truth_sha, "gray_uri": gray_uri, "gray_sha256": sha256_hex(gray_bytes),
              "gray_bit_depth": truth.bit_depth, "width": truth.width, "height": truth.height}
    return [_evaluate_version(models, record, truth, common, request, ground_truth_uri, prefix, nets, eval_config)
            for record in records]


def _evaluate_version(models: Models, record: dict, truth: SourceImage, common: dict, request: ItemRequest,
                      ground_truth_uri: str, prefix: str, nets: PerceptualNets, eval_config: EvalConfig) -> dict:
    prompt = record.get("target_prompt") or record["caption"]
    key = hash_json([EVAL_FORMAT, record["output_sha256"]["master"], common["ground_truth_sha256"], prompt,
                      eval_config.to_dict(), models.model_hash, nets.weights_sha256])
    row_uri = _row_uri(prefix, request.item_id, record["version"])
    if storage.exists(row_uri):
        cached = storage.read_json(row_uri)
        if cached.get("eval_key") == key:
            return dict(cached, reused=True)

    started = time.perf_counter()
    row = _base_row(request, ground_truth_uri)
    row.update(common)
    row.update(
        version=record["version"], status="done", eval_key=key, kind=record.get("kind"), prompt=prompt,
        target_prompt=record.get("target_prompt"), output_uri=record["outputs"]["master"],
        access_uri=record["outputs"].get("access"), output_sha256=record["output_sha256"]["master"],
        cache_key=record.get("cache_key"), preset=record.get("preset"), model_id=record.get("model_id"),
        clip_model_id=record.get("clip_model_id"), model_hash=record.get("model_hash"), smoke_run=record.get("smoke_run"),
        max_delta_l=record.get("max_delta_l"), pipeline_seconds=sum((record.get("seconds") or {}).values()),
        lpips_weights_sha256=nets.weights_sha256["lpips"], fid_weights_sha256=nets.weights_sha256["fid"],
        eval_config=eval_config.to_dict(), reused=False,
    )
    produced = _read_master(row["output_uri"])
    row.update(compare_images(produced, truth.rgb, eval_config, nets.lpips))
    truth_tensor = torch.from_numpy(np.ascontiguousarray(truth.rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    row["clip_score"] = record.get("clip_score")
    if row["clip_score"] is None:
        row["clip_score"] = clip_score(models, torch.from_numpy(unit_rgb(produced).astype(np.float32)).permute(2, 0, 1)[None], prompt)
    row["clip_score_ground_truth"] = clip_score(models, truth_tensor, prompt)
    if nets.fid is not None:
        features = {"output": inception_features(nets.fid, produced, eval_config),
                    "ground_truth": inception_features(nets.fid, truth.rgb, eval_config)}
        storage.write_bytes(_features_uri(prefix, request.item_id, record["version"]),
                            save_safetensors(features, metadata={"eval_key": key}))
    row["eval_seconds"] = time.perf_counter() - started
    storage.write_json(row_uri, _json_safe(row))
    return row


def _json_safe(row: dict) -> dict:
    """NaN and infinities as strings JSON can hold; read back by :func:`_from_json_safe`."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _from_json_safe(row: dict) -> dict:
    return {k: (float(v) if k in METRICS and isinstance(v, str) else v) for k, v in row.items()}


# ---------------------------------------------------------------------------
# A whole eval: rows, FID, summary, tables, report.


EVAL_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("version", pa.int64()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error_message", pa.string()),
        ("caption", pa.string()),
        ("prompt", pa.string()),
        ("kind", pa.string()),
        ("ground_truth_uri", pa.string()),
        ("ground_truth_sha256", pa.string()),
        ("gray_uri", pa.string()),
        ("gray_method", pa.string()),
        ("output_uri", pa.string()),
        ("access_uri", pa.string()),
        ("output_sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        *[(name, pa.float64()) for name in METRICS],
        ("max_delta_l", pa.float64()),
        ("preset", pa.string()),
        ("model_id", pa.string()),
        ("model_hash", pa.string()),
        ("smoke_run", pa.bool_()),
        ("reused", pa.bool_()),
        ("eval_key", pa.string()),
        ("row_json", pa.string()),  # the whole row, for fields without a column
    ]
)


def eval_table(rows: list[dict]) -> pa.Table:
    """The eval rows as a table with :data:`EVAL_SCHEMA`."""
    records = []
    for row in rows:
        record = {name: row.get(name) for name in EVAL_SCHEMA.names if name != "row_json"}
        record["row_json"] = json.dumps(_json_safe(row), sort_keys=True, default=str)
        records.append(record)
    return pa.Table.from_pylist(records, schema=EVAL_SCHEMA)


def _fid(prefix: str, rows: list[dict]) -> tuple[float | None, int]:
    """FID of outputs vs ground truths from the stored features of the done rows, and the image count."""
    real, generated = [], []
    for row in rows:
        if row["status"] not in ("done",):
            continue
        uri = _features_uri(prefix, row["item_id"], row["version"])
        if not storage.exists(uri):
            continue
        data = storage.read_bytes(uri)
        if read_metadata(data).get("eval_key") != row["eval_key"]:
            continue
        tensors = load_safetensors(data)
        real.append(tensors["ground_truth"])
        generated.append(tensors["output"])
    if len(real) < 2:
        return None, len(real)
    return frechet_distance(torch.stack(real), torch.stack(generated)), len(real)


def summarise_eval(rows: list[dict], *, fid: float | None, fid_images: int, missing: dict[str, str],
                   preset: str, models: Models | None, eval_config: EvalConfig) -> dict:
    """Counts, the distribution of every metric over done rows, FID and the missing-metric messages."""
    done = [row for row in rows if row["status"] == "done"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "counts": counts,
        "metrics": {name: summarise([row.get(name) for row in done]) for name in METRICS},
        "fid": fid,
        "fid_images": fid_images,
        "missing": dict(missing),
        "gray_method": GRAY_METHOD,
        "gray_method_text": GRAY_METHOD_TEXT,
        "preset": preset,
        "model_id": None if models is None else models.model_id,
        "clip_model_id": None if models is None else models.clip_id,
        "model_hash": None if models is None else models.model_hash,
        "smoke_run": None if models is None else models.random_weights,
        "eval_config": eval_config.to_dict(),
        "software_version": __version__,
        "reused_rows": sum(1 for row in done if row.get("reused")),
    }


def evaluate_manifest(
    models: Models,
    manifest: str,
    output: str,
    config: PipelineConfig,
    *,
    preset: str = "",
    eval_config: EvalConfig = EvalConfig(),
    weights: PerceptualWeights = PerceptualWeights(),
    items: set[str] | None = None,
    on_row: Progress | None = None,
) -> EvalRun:
    """Evaluates every row of ``manifest`` that has a ground truth; writes the tables and the report.

    Args:
        models: loaded once (:func:`diffcolor.method.models.load_models`) and used for every item.
        manifest: the eval manifest's URI (validated first; ManifestError names bad rows).
        output: the output root; everything goes under ``OUTPUT/eval/``.
        config: the pipeline configuration (a preset).
        preset: the preset's name, for the records.
        eval_config: how outputs are compared.
        weights: the operator's LPIPS and FID weight files (None: those metrics are missing).
        items: only these item ids.
        on_row: called with each row when it is ready (terminal progress).

    Returns:
        :class:`EvalRun`: the rows, the summary and the URIs written
        (``parquet``, ``summary``, ``report`` and one per plot).

    Raises:
        ManifestError: the manifest is invalid. EvalError: no row has a ground truth.
    """
    from diffcolor.archive.manifest import read_items
    from diffcolor.tools.eval_report import write_eval_report

    prefix = eval_prefix(output)
    # 1. The manifest's rows (validated before anything runs).
    requests = list(read_items(manifest, items=items))
    if not any((r.catalogue or {}).get("ground_truth_uri") for r in requests):
        raise EvalError(f"manifest '{manifest}' has no ground_truth_uri values: nothing to evaluate "
                        "(see manifests/README.md, 'Evaluation')")

    # 2. The perceptual networks, once (or the message saying why not).
    nets = load_perceptual_nets(weights, eval_config, models.device)

    # 3. Every item, in manifest order.
    rows: list[dict] = []
    for request in requests:
        for row in evaluate_item(models, request, output, config, nets, preset=preset, eval_config=eval_config):
            row = _from_json_safe(row)
            rows.append(row)
            if on_row is not None:
                on_row(row)

    # 4. FID over the run, from the stored features.
    fid, fid_images = (None, 0)
    missing = dict(nets.missing)
    if nets.fid is not None:
        fid, fid_images = _fid(prefix, rows)
        if fid is None:
            missing["fid"] = f"FID not computed: it needs at least 2 done items with features, got {fid_images}"

    # 5. Summary, table and report.
    summary = summarise_eval(rows, fid=fid, fid_images=fid_images, missing=missing, preset=preset, models=models,
                             eval_config=eval_config)
    uris = {"parquet": EvalLayout(prefix).table, "summary": EvalLayout(prefix).summary,
            "report": EvalLayout(prefix).report}
    buffer = io.BytesIO()
    pq.write_table(eval_table(rows), buffer, compression="zstd")
    storage.write_bytes(uris["parquet"], buffer.getvalue())
    storage.write_json(uris["summary"], _json_safe_summary(summary))
    uris.update(write_eval_report(rows, summary, prefix, uris["report"]))
    return EvalRun(rows=rows, summary=summary, uris=uris)


def _json_safe_summary(summary: dict) -> dict:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(summary)


def read_eval(location: str) -> tuple[list[dict], dict]:
    """The rows and summary of an eval, given its output root, its ``eval/`` folder or its ``eval.parquet``.

    Raises:
        EvalError: nothing readable there.
    """
    candidates = [location] if location.endswith(".parquet") else eval_table_candidates(location)
    for uri in candidates:
        if storage.exists(uri):
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
            rows = [_from_json_safe(json.loads(text)) for text in table.column("row_json").to_pylist()]
            summary_uri = summary_beside(uri)
            summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
            return rows, summary
    raise EvalError(f"no eval found at '{location}' (looked for {' and '.join(candidates)})")
