"""Shared fixtures: the tiny random bundle, loaded once per session, and small gray images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from s3server import s3_bucket, s3_endpoint  # noqa: F401  (real S3 API on loopback)

# The test harness's Prefect server and every flow the tests run send no usage data, as the commands do
# (flows/local.py): the machine is offline and a failed send only clutters the logs.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache folder for the session, shared with CLI subprocesses through DIFFCOLOR_CACHE."""
    folder = tmp_path_factory.mktemp("diffcolor-cache")
    os.environ["DIFFCOLOR_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def models(cache_dir):
    """The tiny bundle, written to the cache and loaded through from_pretrained like real weights."""
    from diffcolor.method.model_names import load_named_models

    return load_named_models("tiny")  # written to DIFFCOLOR_CACHE, the session's cache folder


@pytest.fixture(scope="session")
def bf16_models(cache_dir):
    """The tiny bundle with its frozen matrix weights stored in bf16, as CUDA loads them by default."""
    from diffcolor.method.model_names import load_named_models

    return load_named_models("tiny", weight_dtype="bf16")


@pytest.fixture(scope="session")
def smoke():
    from diffcolor.method.presets import get_preset

    return get_preset("smoke")


def gray_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A gray test scene in [0, 1]: a lightness ramp, a disc and a little texture."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    scene = 0.15 + 0.6 * xs / max(width - 1, 1)
    disc = (ys - height * 0.5) ** 2 + (xs - width * 0.4) ** 2 < (min(height, width) * 0.25) ** 2
    scene = np.where(disc, 0.85 - 0.3 * ys / max(height - 1, 1), scene)
    return np.clip(scene + rng.normal(0, 0.02, scene.shape), 0.0, 1.0)


@pytest.fixture
def gray_png(tmp_path):
    """An 8-bit gray PNG, 96x72."""
    path = tmp_path / "inputs" / "bench.png"
    path.parent.mkdir()
    Image.fromarray(np.round(gray_scene(72, 96) * 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture
def gray_tiff16(tmp_path):
    """A 16-bit gray TIFF, 1200x900 (width x height)."""
    path = tmp_path / "inputs" / "scan16.tif"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.round(gray_scene(900, 1200, seed=3) * 65535).astype(np.uint16)).save(path)
    return path


@pytest.fixture(scope="session")
def prefect_server(cache_dir):
    """A real Prefect server (SQLite) for the whole session, started once (~10 s).

    Importing Prefect here, outside any test, binds its console log handler to
    pytest's session-wide capture; bound inside a test using ``capsys`` it would
    keep writing to that test's closed stream and break every later flow.
    """
    import prefect  # noqa: F401  (configures Prefect's logging now)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class WorkerKilled(Exception):
    """Stands for a worker process killed in the middle of a loop (raised from a progress callback)."""


def killed_at(phase: str, step: int):
    """A ``progress(phase, step, ...)`` callback that kills the "worker" once ``phase`` reaches ``step``.

    The loop calls progress after each step and before that step's checkpoint,
    so the checkpoints of the earlier steps are published and this step's work is lost.
    """
    def progress(current_phase: str, current_step: int, *_) -> None:
        if current_phase == phase and current_step >= step:
            raise WorkerKilled(f"killed in {phase} at step {step}")

    return progress
