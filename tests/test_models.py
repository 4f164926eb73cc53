"""Model loading: the tiny bundle's real layout, provenance hashes, and offline errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diffcolor.common.errors import ModelNotFoundError
from diffcolor.method.models import load_models
from diffcolor.method.tiny import write_tiny_bundle


def test_tiny_bundle_has_the_diffusers_layout_and_loads_from_its_folder(tmp_path, models):
    folder = write_tiny_bundle(tmp_path / "bundle")
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "clip"):
        assert (folder / component).is_dir(), component
    assert (folder / "model_index.json").exists()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()

    loaded = load_models(str(folder))
    assert loaded.random_weights
    assert loaded.vae_scale_factor == 8
    assert set(loaded.weight_sha256) == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "clip/model.safetensors",
    }
    assert all(len(value) == 64 for value in loaded.weight_sha256.values())
    # Same seed, same weights: the folder written here hashes like the cached one.
    assert loaded.model_hash == models.model_hash
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_models_are_frozen_and_the_tokenizer_keeps_caption_words_whole(models):
    assert not any(p.requires_grad for module in (models.unet, models.vae, models.text_encoder, models.clip)
                   for p in module.parameters())
    tokens = models.tokenizer.tokenize("a sks dog on a wooden bench")
    assert tokens == ["a</w>", "sks</w>", "dog</w>", "on</w>", "a</w>", "wooden</w>", "bench</w>"]


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_models(str(tmp_path / "no-such-model"))
    assert "\n" not in str(info.value)


def test_folder_that_is_not_a_bundle_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="unet/config.json"):
        load_models(str(tmp_path / "empty"))


def test_uncached_hub_id_fails_offline_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ModelNotFoundError, match="not available locally") as info:
        load_models("example-org/not-cached-model")
    assert "--allow-download" in str(info.value)


# What a worker process or the review application does with the model name "tiny" when nothing has written the bundle.
FIRST_USE = """
import json, sys
from diffcolor.method.model_names import resolve_model
from review.app import _tokenizer
tokenizer = _tokenizer("tiny")
print(json.dumps({"folder": resolve_model("tiny"), "tokens": tokenizer.tokenize("a red dog on a bench"),
                  "tools": sorted(name for name in sys.modules if name.startswith("diffcolor.tools"))}))
"""


def test_tiny_is_written_on_first_use_by_racing_processes_that_never_import_the_tools(tmp_path):
    cache = tmp_path / "fresh-cache"
    env = {**os.environ, "DIFFCOLOR_CACHE": str(cache)}
    racers = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in outcomes]
    found = [json.loads(out.splitlines()[-1]) for out, _ in outcomes]
    assert found[0] == found[1]
    assert found[0]["tools"] == []  # resolution and the bundle writer are product code, not tools
    assert found[0]["tokens"] == ["a</w>", "red</w>", "dog</w>", "on</w>", "a</w>", "bench</w>"]
    assert [path.name for path in cache.iterdir()] == [os.path.basename(found[0]["folder"])]  # no staging left over


def test_cli_missing_model_prints_one_line_and_no_traceback(tmp_path, gray_png, cache_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "diffcolor", "colorize", str(gray_png), "--caption", "a dog", "--model",
         str(tmp_path / "missing-model"), "--out", str(tmp_path / "out"), "--preset", "smoke"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("diffcolor: error:")]
    assert len(errors) == 1 and "missing-model" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("component", ["unet", "clip"])
def test_a_pickled_model_is_refused_with_one_line_before_anything_is_unpickled(tmp_path, component, monkeypatch):
    folder = write_tiny_bundle(tmp_path / "bundle")
    weights = next((folder / component).glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))  # what an old checkpoint folder holds: pytorch_model.bin & co

    import torch

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickled weight file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelNotFoundError, match="pickled weight file") as info:
        load_models(str(folder))
    assert "\n" not in str(info.value) and f"{component}/" in str(info.value) and ".bin" in str(info.value)


def test_models_loaded_in_threads_at_once_leave_the_default_device_alone(models):
    # Two flow runs (or recolour jobs) of one process load their models at once. transformers builds under
    # torch's device context, whose current device is one global: unserialised, the builds restored each
    # other's saved device and left the whole process at "meta" (later tensors had no data).
    import threading

    import torch

    from diffcolor.method.model_names import load_named_models

    errors, loaded = [], []

    def load() -> None:
        try:
            loaded.append(load_named_models("tiny"))
        except BaseException as error:  # a thread's exception fails the test, not a warning
            errors.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads)
    assert errors == [] and len(loaded) == 9
    assert torch.get_default_device() == torch.device("cpu")
    assert torch.zeros(2).device.type == "cpu" and torch.nn.Linear(2, 2).weight.device.type == "cpu"
    assert all(parameter.device.type == "cpu" for parameter in loaded[-1].unet.parameters())
