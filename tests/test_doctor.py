"""diffcolor doctor: a model checked offline without loading it; the collection flow refuses a broken one first."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import _diffcolor_blocked

from diffcolor.cli import main
from diffcolor.common.errors import ModelNotFoundError
from diffcolor.method.doctor import check_model, format_report
from diffcolor.method.models import resolve_model_hash
from diffcolor.method.tiny import tiny_bundle_folder


@pytest.fixture
def bundle(tmp_path, cache_dir):
    """A copy of the tiny bundle to break."""
    return shutil.copytree(tiny_bundle_folder(), tmp_path / "bundle")


def test_the_tiny_bundle_passes_with_the_scheduler_and_hash_load_models_will_have(models):
    report = check_model("tiny", device="cpu")
    assert report.ok, report.problems

    scheduler = report.facts("scheduler")
    assert scheduler["class"] == "DDIMScheduler" and scheduler["config_class"] == "PNDMScheduler"
    assert scheduler["clip_sample"] is False and scheduler["prediction_type"] == "epsilon"
    assert scheduler["steps_offset"] == 1 and scheduler["timestep_spacing"] == "leading"
    # PNDM's config has no clip_sample: DDIM's default (true) is corrected, and said so as a note, not a problem.
    [correction] = scheduler["corrections"]
    assert correction.startswith("clip_sample missing") and correction in report.check("scheduler").notes

    # The hashes are load_models' own, file by file, and the model hash the planner uses.
    weights = report.facts("weights")
    assert report.model_hash == models.model_hash == resolve_model_hash(str(tiny_bundle_folder()))
    assert weights["weight_sha256"] == models.weight_sha256
    assert weights["dtypes"] == ["float32"] and all(entry["bytes"] > 0 for entry in weights["files"])

    assert report.facts("shapes")["tensors"]["unet"] == len(models.unet.state_dict())
    assert report.facts("random")["random_weights"]
    device = report.facts("device")
    assert device["device"] == "cpu" and device["weight_dtype"] == "float32"
    loaded = sum(p.numel() * p.element_size() for m in (models.unet, models.vae, models.text_encoder, models.clip)
                 for p in m.state_dict().values())
    assert device["frozen_weight_bytes"] == loaded  # what the loaded, frozen modules hold in fp32
    assert report.lines()[-1].startswith("OK: no problems")


def _remove_unet_config(folder):
    (folder / "unet" / "config.json").unlink()


def _pickle_unet_weights(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


def _reshape_one_unet_tensor(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_in.weight"] = torch.zeros(32, 4, 5, 5)  # the config's conv_in has a 3x3 kernel
    save_file(tensors, path)


def _remove_vae(folder):
    shutil.rmtree(folder / "vae")


@pytest.mark.parametrize(("breaks", "problem"), [
    (_remove_unet_config, "layout: unet/config.json is missing"),
    (_pickle_unet_weights, "weights: unet/diffusion_pytorch_model.bin is a pickled weight file, which DiffColor "
                           "never loads (it can run code)"),
    (_reshape_one_unet_tensor, "shapes: unet: wrong shape conv_in.weight is [32, 4, 5, 5], its config makes "
                               "[32, 4, 3, 3]"),
    (_remove_vae, "layout: vae/ is missing"),
])
def test_a_broken_folder_exits_1_with_a_line_naming_the_problem(bundle, tmp_path, capsys, breaks, problem):
    breaks(bundle)
    report_path = tmp_path / "report.json"
    assert main(["doctor", str(bundle), "--json", str(report_path)]) == 1
    printed = capsys.readouterr().out.splitlines()
    lines = [line for line in printed if line.startswith("PROBLEM")]
    assert len(lines) == 1, printed
    assert lines[0].startswith(f"PROBLEM  {problem}"), lines[0]
    assert printed[-1].startswith("FAILED: 1 problem")

    report = json.loads(report_path.read_text())
    assert report["ok"] is False and len(report["problems"]) == 1 and report["problems"][0].startswith(problem)
    # No model hash for a model load_models refuses; one whose resolution it accepts still hashes.
    assert (report["model_hash"] is None) == (breaks is not _reshape_one_unet_tensor)
    if breaks is _pickle_unet_weights:
        # The reason is load_models' own, word for word.
        with pytest.raises(ModelNotFoundError) as refused:
            resolve_model_hash(str(bundle))
        assert str(refused.value).endswith(report["problems"][0].removeprefix("weights: "))


def test_an_uncached_hub_id_is_one_problem_and_no_network(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert main(["doctor", "example-org/not-cached-model", "--json", "-"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds the JSON alone; the text report went to stderr
    [problem] = report["problems"]
    assert problem.startswith("resolution: Stable Diffusion model 'example-org/not-cached-model' is not available locally")
    assert "PROBLEM" in captured.err


def test_a_hub_id_in_the_local_cache_resolves_to_its_snapshot(tmp_path, monkeypatch, cache_dir):
    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--example-org--tiny-sd"
    shutil.copytree(tiny_bundle_folder(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    report = check_model("example-org/tiny-sd")
    assert report.ok, report.problems
    assert report.facts("resolution")["kind"] == "a hub id in the local cache"
    assert report.facts("resolution")["folder"] == str(repo / "snapshots" / revision)


def test_several_problems_are_each_a_line_and_a_bad_prediction_type_is_one(bundle, capsys):
    config_path = bundle / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "sample"
    config_path.write_text(json.dumps(config))
    text_config = json.loads((bundle / "text_encoder" / "config.json").read_text())
    text_config["hidden_size"] = 48
    (bundle / "text_encoder" / "config.json").write_text(json.dumps(text_config))

    report = check_model(str(bundle))
    assert "scheduler: scheduler prediction_type 'sample' is not supported; the method handles epsilon, " \
           "v_prediction" in report.problems
    assert "consistency: text_encoder hidden_size 48 != unet cross_attention_dim 32: the components do not " \
           "belong together" in report.problems
    wrong_shapes = [p for p in report.problems if p.startswith("shapes: text_encoder: wrong shape")]
    # 34 of the 36 tensors (all but the two fc1 biases) change with the width: 5 lines, then a count.
    assert len(wrong_shapes) == 5 and report.problems.count("shapes: text_encoder: ... and 29 more (wrong shape)") == 1
    assert all("\n" not in problem for problem in report.problems)


def test_components_configured_in_float16_load_in_fp32_and_encode(bundle):
    """transformers 5 would load them in their config's dtype and the first fp32 layer norm would fail."""
    from diffcolor.method.diffusion import clip_text_features, encode_prompts
    from diffcolor.method.models import load_models

    for component in ("text_encoder", "clip"):
        path = bundle / component / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), dtype="float16")))
    assert check_model(str(bundle)).ok
    models = load_models(str(bundle))
    assert {p.dtype for p in models.text_encoder.parameters()} == {torch.float32}
    assert encode_prompts(models, ["a dog"]).dtype == torch.float32 and clip_text_features(models, ["a dog"]).shape[0] == 1


def test_doctor_tiny_on_the_command_line_without_prefect(cache_dir):
    done = _diffcolor_blocked("doctor", "tiny", "--device", "cpu", block=("prefect", "prefect_ray"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "diffcolor doctor: tiny" and lines[-1].startswith("OK: no problems")
    for check in ("resolution", "layout", "weights", "shapes", "consistency", "scheduler", "clip", "random", "device"):
        assert any(line.startswith(f"ok       {check}: ") for line in lines), check
    assert any("clip_sample false, prediction_type epsilon, steps_offset 1" in line for line in lines)
    assert any(line.startswith("note") and "random weights: outputs will be labelled smoke runs" in line for line in lines)
    assert "Traceback" not in done.stderr


def test_the_collection_flow_refuses_a_broken_model_before_any_item(prefect_server, bundle, tmp_path):
    from test_flows import _collection

    from flows.collection import RunOptions, colorize_collection

    _remove_unet_config(bundle)
    _remove_vae(bundle)
    manifest, out = _collection(tmp_path, count=1), tmp_path / "out"
    state = colorize_collection(str(manifest), str(out), str(bundle), RunOptions(preset="smoke", pool="inline"),
                                return_state=True)
    # The refusal ends the flow run Failed with its one line (no logged traceback), naming every problem.
    assert state.is_failed()
    problems = ["layout: unet/config.json is missing",
                "layout: vae/ is missing: a Stable Diffusion bundle has unet, vae, text_encoder, tokenizer, scheduler"]
    assert "fails its pre-flight check (2 problems)" in state.message, state.message
    assert all(problem in state.message for problem in problems), state.message
    assert not out.exists()


def test_on_a_gpu_the_weights_are_counted_in_bf16_against_its_memory(monkeypatch, cache_dir):
    """The CUDA branch on a CPU machine: torch.cuda answers for a 2 MiB device (no CUDA call is made for real)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Test GPU", total_memory=2 * 2**20))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (2**20, 2 * 2**20))
    on_cpu = check_model("tiny", device="cpu").facts("device")
    report = check_model("tiny")  # auto: CUDA when present
    device = report.facts("device")
    assert device["device"] == "cuda" and device["device_name"] == "Test GPU" and device["weight_dtype"] == "bfloat16"
    # Matrix weights take half the bytes in bf16; norms and embeddings stay fp32 (diffcolor.method.performance).
    assert on_cpu["frozen_weight_bytes"] / 2 < device["frozen_weight_bytes"] < on_cpu["frozen_weight_bytes"]
    assert device["free_memory"] == 2**20
    assert report.problems == [f"device: the frozen weights take {device['frozen_weight_bytes']:,} bytes in bfloat16, "
                               f"more than the device's {2 * 2**20:,}"]
    assert check_model("tiny", weight_dtype="fp32", probe_memory=False).facts("device")["weight_dtype"] == "float32"


def test_a_variant_file_is_noted_and_a_variant_alone_is_a_problem(bundle):
    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, bundle / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    report = check_model(str(bundle))
    assert report.ok, report.problems
    assert ("unet/diffusion_pytorch_model.fp16.safetensors: fp16 variant, not loaded (load_models reads the default "
            "weights)") in report.check("weights").notes
    assert report.model_hash == resolve_model_hash(str(bundle))  # variants are not part of it

    weights.unlink()
    [problem] = check_model(str(bundle)).problems
    assert problem.startswith("weights: unet/ has no diffusion_pytorch_model.safetensors, only "
                              "diffusion_pytorch_model.fp16.safetensors")


def test_the_doctor_reports_the_working_size_and_refuses_a_caption_the_text_encoder_would_cut(cache_dir):
    long_caption = ", ".join(["a dog near a tree and a house"] * 6) + ", and the sky"
    report = check_model("tiny", device="cpu", probe_memory=False, hashes=False,
                         captions=["a dog sitting on a wooden bench", long_caption])
    text = format_report(report)
    assert report.facts("consistency")["native_side"] == 64 and "working size 64x64 (UNet sample_size 8" in text
    prompts = report.check("prompts")
    assert prompts.facts["model_max_length"] == 77 and prompts.facts["identifier_rule"] == "nouns"
    assert len(prompts.problems) == 1 and prompts.problems[0].startswith("caption 2: the caption with its identifiers is")
    assert "would be cut off" in prompts.problems[0] and "sks" not in prompts.problems[0]
    assert "caption 1: 11 of 77 tokens with its identifiers: a sks dog sitting on a wooden sks bench" in text
    assert not report.ok
