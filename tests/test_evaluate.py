"""Quality evaluation: the demo ground-truth set end to end, each metric against an independent reference,
LPIPS/FID weight files, reuse, and the comparison of two evals."""

from __future__ import annotations

import hashlib
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from diffcolor.cli import main
from diffcolor.common.items import ItemRequest
from diffcolor.tools.eval_metrics import METRICS
from diffcolor.tools.evaluate import (
    EvalConfig,
    PerceptualWeights,
    compare_images,
    eval_table,
    evaluate_item,
    evaluate_manifest,
    frechet_distance,
    load_lpips_network,
    load_perceptual_nets,
    read_eval,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
DEMO = MANIFESTS / "eval-demo.parquet"
DEMO_ITEMS = {"astronaut", "chelsea", "coffee", "rocket"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alexnet_like_torchvision(weights=None):
    """torchvision.models.alexnet's feature layers, layer for layer (torchvision/models/alexnet.py).

    Stands in for torchvision where no torchvision build matches the installed
    torch (this CPU-only CI): the LPIPS network itself is still torchmetrics'.
    """
    from torch import nn

    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
    )
    return model


@pytest.fixture(scope="module")
def alexnet():
    """torchvision's alexnet where torchvision imports, else the stand-in above, handed to torchmetrics' LPIPS."""
    try:
        import torchvision

        real = torchvision.models.alexnet
    except Exception:  # not installed, or a build for another torch (RuntimeError at import)
        real = None
    if real is not None:
        yield real
        return
    import torchmetrics.functional.image.lpips as lpips_module

    def features(net: str, pretrained: bool = False):
        assert net == "alexnet" and not pretrained  # the eval never asks torchvision for weights
        return _alexnet_like_torchvision().features

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lpips_module, "_get_tv_model_features", features)
        yield _alexnet_like_torchvision


def _backbone_file(alexnet) -> bytes:
    """A random-weight AlexNet backbone saved as torchvision's file is (``features.N.*`` and more)."""
    torch.manual_seed(0)
    state = {f"features.{key}": value for key, value in alexnet(weights=None).features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of torchvision's file is ignored
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lpips_weights(alexnet, tmp_path_factory):
    """A folder holding a random AlexNet backbone file, and its name (torch.hub's: its own sha256 prefix).

    Real weights cannot be downloaded here; with :func:`_accepting` this runs the
    whole LPIPS path (file, check, load into torchmetrics' network) with weights
    whose values mean nothing.
    """
    data = _backbone_file(alexnet)
    name = f"alexnet-owt-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    folder = tmp_path_factory.mktemp("lpips-weights")
    (folder / name).write_bytes(data)
    return folder, name


def _accepting(patch: pytest.MonkeyPatch, name: str) -> None:
    """Makes the eval expect the test backbone file instead of torchvision's."""
    import diffcolor.tools.evaluate as evaluate

    patch.setitem(evaluate.LPIPS_BACKBONE_FILES, "alex", (name, "https://example.invalid/" + name))


@pytest.fixture(scope="module")
def demo_eval(models, smoke, lpips_weights, tmp_path_factory):
    """The whole eval of the demo ground-truth set with the tiny bundle and preset smoke, run once.

    LPIPS gets a (random) backbone file; FID gets none, so its message is checked.
    """
    folder, name = lpips_weights
    before = {path.name: _sha256(path) for path in (MANIFESTS / "eval").iterdir()}
    output = tmp_path_factory.mktemp("eval-demo")
    with pytest.MonkeyPatch.context() as patch:
        _accepting(patch, name)
        run = evaluate_manifest(models, str(DEMO), str(output), smoke, preset="smoke",
                                weights=PerceptualWeights(lpips=str(folder)))
    return run, output, before


# ---------------------------------------------------------------------------
# The demo set end to end.


def test_demo_eval_gives_every_metric_finite_for_every_item(demo_eval):
    run, output, before = demo_eval
    assert {row["item_id"] for row in run.rows} == DEMO_ITEMS
    assert run.summary["counts"] == {"done": 4}
    for row in run.rows:
        for name in METRICS:
            assert math.isfinite(row[name]), (row["item_id"], name, row[name])
        assert row["gray_method"] == "cie_lstar" and row["smoke_run"] is True
        assert row["lpips_weights_sha256"] and 0.0 < row["lpips"]
    for name in METRICS:
        assert run.summary["metrics"][name]["count"] == 4
    # The table holds the same numbers.
    table = pq.read_table(output / "eval" / "eval.parquet").to_pylist()
    assert [r["item_id"] for r in table] == [r["item_id"] for r in run.rows]
    assert table[0]["psnr_chroma"] == pytest.approx(run.rows[0]["psnr_chroma"])


def test_demo_eval_without_the_fid_weight_file_names_it_and_still_completes(demo_eval):
    run, _, _ = demo_eval
    missing = run.summary["missing"]
    assert set(missing) == {"fid"}
    assert "weights-inception-2015-12-05-6726825d.pth" in missing["fid"] and "--fid-weights" in missing["fid"]
    assert "\n" not in missing["fid"]
    assert run.summary["fid"] is None and run.summary["counts"] == {"done": 4}


def test_gray_inputs_keep_the_ground_truth_lightness_and_are_written_under_the_eval(demo_eval):
    run, output, before = demo_eval
    # Nothing is written beside the ground truths, which are unchanged.
    assert {path.name: _sha256(path) for path in (MANIFESTS / "eval").iterdir()} == before
    for row in run.rows:
        gray_path = Path(row["gray_uri"])
        assert gray_path.parent == output / "eval" / "inputs"
        gray = np.asarray(Image.open(gray_path)).astype(np.float64) / 255.0
        truth = np.asarray(Image.open(row["ground_truth_uri"]).convert("RGB")).astype(np.float64) / 255.0
        gray_l = rgb2lab(np.repeat(gray[..., None], 3, axis=-1))[..., 0]
        # 8-bit quantisation of the gray moves L* by at most ~0.4.
        assert np.abs(gray_l - rgb2lab(truth)[..., 0]).max() < 0.6


def test_demo_eval_psnr_and_ssim_match_independent_computations_on_the_written_files(demo_eval):
    import tifffile

    run, _, _ = demo_eval
    for row in run.rows:
        produced = tifffile.imread(row["output_uri"]).astype(np.float64) / 255.0
        truth = np.asarray(Image.open(row["ground_truth_uri"]).convert("RGB")).astype(np.float64) / 255.0
        assert row["psnr_rgb"] == pytest.approx(10 * np.log10(1.0 / np.mean((produced - truth) ** 2)), abs=1e-3)
        assert row["ssim_rgb"] == pytest.approx(_torchmetrics_ssim_without_border(produced, truth, 1.0), abs=1e-4)


def test_demo_eval_clip_scores_match_transformers_own_preprocessing(demo_eval, models):
    from transformers import CLIPModel, CLIPProcessor

    run, _, _ = demo_eval
    model, processor = CLIPModel.from_pretrained(models.clip_folder), CLIPProcessor.from_pretrained(models.clip_folder)
    compared = 0
    for row in run.rows:
        image = Image.open(row["ground_truth_uri"]).convert("RGB")
        inputs = processor(text=[row["prompt"]], images=image, return_tensors="pt", padding="max_length")
        with torch.no_grad():
            cosine = float(model(**inputs).logits_per_image[0, 0] / model.logit_scale.exp())
        reference = 100.0 * max(cosine, 0.0)  # torchmetrics' CLIP score definition
        assert row["clip_score_ground_truth"] == pytest.approx(reference, abs=0.1)
        compared += reference > 0
    assert compared  # at least one positive score, so the check is not vacuous


def test_demo_eval_writes_plots_and_a_report_that_opens_offline(demo_eval):
    run, output, _ = demo_eval
    for name in ("metric_distributions", "colorfulness"):
        path = output / "eval" / "plots" / f"{name}.png"
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > 300
        assert run.uris[f"plot_{name}"] == str(path)

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.sources += [value for key, value in attrs if key in ("src", "href")]

    page = (output / "eval" / "report.html").read_text(encoding="utf-8")
    links = Links()
    links.feed(page)
    # Every picture is embedded; nothing is fetched from anywhere.
    assert links.sources and all(source.startswith("data:image/") for source in links.sources)
    assert "script" not in links.tags and "link" not in links.tags
    assert len(links.sources) == 3 * 4 + 2  # three thumbnails per item, two plots
    for item in DEMO_ITEMS:
        assert f"<td>{item}<br>" in page
    assert "weights-inception-2015-12-05-6726825d.pth" in page and "SMOKE RUN" in page


def test_eval_cli_reuses_outputs_and_rows_and_prints_a_one_screen_summary(demo_eval, lpips_weights, capsys, tmp_path,
                                                                          monkeypatch):
    run, output, _ = demo_eval
    results_before = {p: p.stat().st_mtime_ns for p in (output / "eval" / "items").glob("*/result.json")}
    wrong = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    wrong.write_bytes(b"not the inception weights")
    folder, name = lpips_weights
    _accepting(monkeypatch, name)

    code = main(["eval", str(DEMO), "--out", str(output), "--model", "tiny", "--preset", "smoke",
                 "--lpips-weights", str(folder), "--fid-weights", str(wrong)])

    assert code == 0
    out = capsys.readouterr().out
    # No colourisation and no metric was recomputed.
    assert {p: p.stat().st_mtime_ns for p in (output / "eval" / "items").glob("*/result.json")} == results_before
    rows, summary = read_eval(str(output))
    assert summary["reused_rows"] == 4 and all(row["reused"] for row in rows)
    assert [row["psnr_rgb"] for row in rows] == [row["psnr_rgb"] for row in run.rows]
    # The summary fits a screen and says which file is missing or wrong.
    assert len(out.splitlines()) <= 24
    assert "psnr_rgb" in out and "report:" in out and "4 rows reused" in out
    assert "FID not computed" in out and "its sha256 starts" in out and "6726825d" in out


# ---------------------------------------------------------------------------
# Comparing two evals.


def test_eval_compare_prints_and_plots_the_differences(demo_eval, tmp_path, capsys):
    run, output, _ = demo_eval
    better = [dict(row, psnr_rgb=row["psnr_rgb"] + 1.5, lpips=row["lpips"] - 0.01) for row in run.rows]
    other = tmp_path / "b" / "eval"
    other.mkdir(parents=True)
    pq.write_table(eval_table(better), other / "eval.parquet")
    (other / "summary.json").write_text(json.dumps({"fid": None}))

    code = main(["eval-compare", str(output), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])

    assert code == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("psnr_rgb"))
    assert "+1.500" in line and line.rstrip().endswith("4/0")  # B better on all four items
    ssim_line = next(line for line in out.splitlines() if line.startswith("ssim_rgb"))
    assert "+0.000" in ssim_line
    lpips_line = next(line for line in out.splitlines() if line.startswith("lpips"))
    assert "-0.010" in lpips_line and lpips_line.rstrip().endswith("4/0")  # lower LPIPS is better
    with Image.open(tmp_path / "cmp" / "compare.png") as picture:
        assert picture.format == "PNG"
    table = pq.read_table(tmp_path / "cmp" / "compare.parquet").to_pylist()
    assert {row["item_id"] for row in table} == DEMO_ITEMS
    assert all(row["psnr_rgb_diff"] == pytest.approx(1.5) for row in table)


def test_without_matplotlib_the_reports_are_written_without_plots_and_say_so(demo_eval, tmp_path, monkeypatch):
    """matplotlib is the `plots` extra: an eval host without it still gets its report and comparison."""
    from diffcolor.tools import eval_report
    from diffcolor.tools.eval_report import (
        compare_evals,
        write_comparison,
        write_eval_report,
    )

    run, _, _ = demo_eval
    monkeypatch.setattr(eval_report, "plots_available", lambda: False)
    uris = write_eval_report(run.rows, run.summary, str(tmp_path / "eval"), str(tmp_path / "eval" / "report.html"))
    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert uris == {} and not (tmp_path / "eval" / "plots").exists()
    assert "<figure>" not in page and "plots need matplotlib" in page
    assert all(f"<td>{item}<br>" in page for item in DEMO_ITEMS)

    comparison = compare_evals(run.rows, run.summary, run.rows, run.summary)
    written = write_comparison(comparison, "a", "b", str(tmp_path / "cmp"))
    assert written["plot"] is None and not (tmp_path / "cmp" / "compare.png").exists()
    assert "plots need matplotlib" in (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# Item failures do not stop an eval.


def test_missing_or_gray_ground_truth_gives_a_failed_row_not_an_error(models, smoke, tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8), mode="L").save(gray)
    nets = load_perceptual_nets(PerceptualWeights())
    cases = {
        "gone": ({"ground_truth_uri": str(tmp_path / "missing.png")}, "failed", "input_unavailable"),
        "gray": ({"ground_truth_uri": str(gray)}, "failed", "bad_eval"),
        "none": ({}, "no_ground_truth", "bad_eval"),
    }
    for item_id, (catalogue, status, error_class) in cases.items():
        request = ItemRequest(item_id=item_id, source_uri=str(gray), caption="a dog on a bench", catalogue=catalogue)
        [row] = evaluate_item(models, request, str(tmp_path / "out"), smoke, nets)
        assert (row["status"], row["error_class"]) == (status, error_class), row
        assert row["error_message"]


# ---------------------------------------------------------------------------
# Each metric against an independent reference value.


def _scene(height=96, width=128, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([0.2 + 0.6 * xs, 0.3 + 0.4 * ys, 0.5 + 0.3 * np.sin(6 * xs)], axis=-1)
    return np.clip(base + rng.normal(0, 0.02, base.shape), 0.1, 0.9)


def test_psnr_of_known_noise_levels():
    truth = _scene()
    # A +-0.01 checkerboard: MSE exactly 1e-4, so 40 dB.
    signs = np.where((np.indices(truth.shape[:2]).sum(0) % 2)[..., None] == 0, 1.0, -1.0)
    assert compare_images(truth + 0.01 * signs, truth)["psnr_rgb"] == pytest.approx(40.0, abs=1e-3)
    # Gaussian noise of sigma 0.05: 20 log10(1 / 0.05) = 26.02 dB.
    noisy = truth + np.random.default_rng(1).normal(0, 0.05, truth.shape)
    assert compare_images(np.clip(noisy, 0, 1), truth)["psnr_rgb"] == pytest.approx(26.02, abs=0.15)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    truth = _scene()
    values = compare_images(truth, truth)
    assert values["psnr_rgb"] == math.inf and values["psnr_chroma"] == math.inf
    assert values["ssim_rgb"] == pytest.approx(1.0, abs=1e-6) and values["ssim_chroma"] == pytest.approx(1.0, abs=1e-6)
    assert values["colorfulness_gap"] == 0.0


def _torchmetrics_ssim_without_border(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """torchmetrics' SSIM map (Gaussian 11 px, sigma 1.5) averaged without the 5 px border, as Wang et al. do."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()  # noqa: E731
    _, full = structural_similarity_index_measure(as_tensor(a), as_tensor(b), data_range=data_range, return_full_image=True)
    return float(full[..., 5:-5, 5:-5].mean())


def test_ssim_and_chroma_metrics_match_independent_implementations():
    truth = _scene()
    produced = np.clip(truth + np.random.default_rng(2).normal(0, 0.05, truth.shape), 0, 1)
    values = compare_images(produced, truth)
    assert values["ssim_rgb"] == pytest.approx(_torchmetrics_ssim_without_border(produced, truth, 1.0), abs=1e-4)
    ab_truth, ab_produced = rgb2lab(truth)[..., 1:], rgb2lab(produced)[..., 1:]  # scikit-image's Lab, not kornia's
    reference = 10 * np.log10(256.0**2 / np.mean((ab_truth - ab_produced) ** 2))
    assert values["psnr_chroma"] == pytest.approx(reference, abs=0.01)
    assert values["ssim_chroma"] == pytest.approx(_torchmetrics_ssim_without_border(ab_produced, ab_truth, 256.0), abs=1e-3)


def test_a_gray_output_has_chroma_psnr_of_the_ground_truths_chroma_energy():
    truth = _scene()
    gray = np.repeat(np.mean(truth, axis=-1, keepdims=True), 3, axis=-1)  # a*, b* = 0 everywhere
    reference = 10 * np.log10(256.0**2 / np.mean(rgb2lab(truth)[..., 1:] ** 2))
    values = compare_images(gray, truth)
    assert values["psnr_chroma"] == pytest.approx(reference, abs=0.01)
    assert values["colorfulness"] == pytest.approx(0.0, abs=1e-9)


def test_colorfulness_of_a_flat_red_image_is_hasler_suesstrunks_value():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    # rg = 255 and yb = 127.5 everywhere: no spread, M = 0.3 * hypot(255, 127.5).
    values = compare_images(np.zeros_like(red), red)
    assert values["colorfulness_ground_truth"] == pytest.approx(0.3 * math.hypot(255.0, 127.5))


def test_frechet_distance_of_two_known_gaussians():
    # Exactly: for Y = s X + m, mu_Y = s mu_X + m and S_Y = s^2 S_X, so
    # d^2 = |(1 - s) mu_X - m|^2 + (1 - s)^2 tr(S_X), whatever X is.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)) @ rng.normal(size=(6, 6))
    s, m = 1.7, rng.normal(size=6)
    expected = np.sum(((1 - s) * x.mean(0) - m) ** 2) + (1 - s) ** 2 * np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(s * x + m)) == pytest.approx(expected, rel=1e-6)
    # Large samples of N(0, I) and N(mu, diag(sigma^2)): d^2 = |mu|^2 + sum (1 - sigma)^2.
    mu, sigma = np.array([1.0, -2.0, 0.5, 0.0]), np.array([1.0, 2.0, 0.5, 3.0])
    a = rng.normal(size=(200_000, 4))
    b = mu + sigma * rng.normal(size=(200_000, 4))
    closed_form = np.sum(mu**2) + np.sum((1 - sigma) ** 2)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(closed_form, rel=0.01)


def test_frechet_distance_matches_scipys_matrix_square_root():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * np.real(sqrtm(ca @ cb)))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 5), torch.zeros(3, 5))


# ---------------------------------------------------------------------------
# LPIPS and FID weight files.


def test_weight_files_that_are_missing_or_wrong_give_one_line_messages_naming_the_file(tmp_path):
    nets = load_perceptual_nets(PerceptualWeights())
    assert nets.lpips is None and nets.fid is None
    assert "pass --lpips-weights PATH to alexnet-owt-7be5be79.pth" in nets.missing["lpips"]
    assert "pass --fid-weights PATH to weights-inception-2015-12-05-6726825d.pth" in nets.missing["fid"]

    empty = tmp_path / "weights"
    empty.mkdir()
    nets = load_perceptual_nets(PerceptualWeights(lpips=str(empty), fid=str(empty)))
    assert f"--lpips-weights {empty}: file not found (expected alexnet-owt-7be5be79.pth" in nets.missing["lpips"]
    assert "pt_inception-2015-12-05-6726825d.pth" in nets.missing["fid"]

    (empty / "alexnet-owt-7be5be79.pth").write_bytes(b"something else")
    nets = load_perceptual_nets(PerceptualWeights(lpips=str(empty)))
    assert "is not alexnet-owt-7be5be79.pth: its sha256 starts" in nets.missing["lpips"]
    assert all("\n" not in message for message in nets.missing.values())


class _NotATensor:
    pass


def test_lpips_network_takes_the_operators_backbone_file_and_measures(alexnet):
    data = _backbone_file(alexnet)
    state = torch.load(io.BytesIO(data), weights_only=True)

    network = load_lpips_network(data, "alex")

    loaded = network.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    truth = _scene(64, 64)
    produced = np.clip(truth + np.random.default_rng(5).normal(0, 0.1, truth.shape), 0, 1)
    assert compare_images(truth, truth, lpips=network)["lpips"] == pytest.approx(0.0, abs=1e-7)
    forward = compare_images(produced, truth, lpips=network)["lpips"]
    assert forward > 0 and forward == pytest.approx(compare_images(truth, produced, lpips=network)["lpips"], rel=1e-5)

    # A file that lacks backbone layers, or that holds anything but tensors, is refused.
    del state["features.8.weight"]
    torch.save(state, buffer := io.BytesIO())
    with pytest.raises(ValueError, match="features.8.weight"):
        load_lpips_network(buffer.getvalue(), "alex")
    torch.save({"features.0.weight": _NotATensor()}, buffer := io.BytesIO())
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        load_lpips_network(buffer.getvalue(), "alex")


@pytest.mark.real_weights  # needs the `fid` extra (torch-fidelity + a torchvision built for this torch): GPU hosts
def test_fid_network_takes_the_operators_inception_file(monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    from diffcolor.tools.evaluate import inception_features, load_fid_network

    # A random-weight InceptionV3 with torch-fidelity's keys, saved as an operator's file would be:
    # built with torch-fidelity's own loading switched off for the moment.
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: None)
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        random_net = inception.FeatureExtractorInceptionV3("random", ["2048"])
    buffer = io.BytesIO()
    torch.save(random_net.state_dict(), buffer)

    network = load_fid_network(buffer.getvalue())

    key = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(network.state_dict()[key], random_net.state_dict()[key])
    rng = np.random.default_rng(6)
    features = torch.stack([inception_features(network, rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)) for _ in range(3)])
    assert features.shape == (3, 2048)
    assert frechet_distance(features, features + 0.1) == pytest.approx(2048 * 0.01, rel=1e-4)


def test_eval_config_default_is_recorded(demo_eval):
    run, _, _ = demo_eval
    assert run.summary["eval_config"] == EvalConfig().to_dict()
    assert run.rows[0]["eval_config"]["chroma_data_range"] == 256.0
