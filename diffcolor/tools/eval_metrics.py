"""The metrics an eval reports, named once for the eval, its report and its comparisons."""

from __future__ import annotations

# Per-item metrics, their unit and whether higher is better (None: neither; judged against the ground truth).
METRICS: dict[str, tuple[str, bool | None]] = {
    "psnr_rgb": ("dB", True),
    "ssim_rgb": ("", True),
    "psnr_chroma": ("dB", True),
    "ssim_chroma": ("", True),
    "lpips": ("", False),
    "clip_score": ("", True),
    "clip_score_ground_truth": ("", None),
    "colorfulness": ("", None),
    "colorfulness_ground_truth": ("", None),
    "colorfulness_gap": ("", None),
}
RUN_METRICS: dict[str, tuple[str, bool | None]] = {"fid": ("", False)}
