"""Prompts for people and prompts for the model; free prompts aligned to the caption; alpha and learning rates."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from diffcolor.archive.metadata import read_xmp
from diffcolor.archive.report import render_report
from diffcolor.archive.results import write_results
from diffcolor.cli import main
from diffcolor.common.captions import (
    build_target_prompt,
    colored_caption,
    describe_color_map,
    prompt_slots,
    rewrite_caption,
    slot_prompt,
)
from diffcolor.common.errors import PromptError
from diffcolor.common.items import ItemRequest
from diffcolor.method.presets import apply_overrides
from diffcolor.method.render import ALPHA_RANGE, RenderConfig, resolve_target
from diffcolor.method.training import (
    DEFAULT_LEARNING_RATES,
    AdapterConfig,
    learning_rate,
)
from diffcolor.pipeline import colorize_item

CAPTION = "A dog, sitting on a wooden bench."


# ---------------------------------------------------------------------------
# Caption rules (no model).


def test_free_prompt_colours_go_into_the_slots_of_the_words_they_precede():
    rewritten = rewrite_caption(CAPTION)
    assert rewritten.text == "A sks dog , sks sitting on a sks wooden sks bench ."
    # Case, spacing and punctuation of the target do not matter; the model's prompt keeps the caption's.
    colors = prompt_slots(rewritten, "a brown dog sitting on a wooden green bench")
    assert colors == {0: "brown", 3: "green"}
    assert slot_prompt(rewritten, colors) == "A brown dog , sks sitting on a sks wooden green bench ."
    assert colored_caption(rewritten, colors) == "A brown dog, sitting on a wooden green bench."


@pytest.mark.parametrize("target, reason", [
    ("a cat sitting on a wooden bench", "changes the caption's words ('dog' -> 'cat')"),
    ("a dog sitting on a bench", "leaves out the caption's words 'wooden'"),
    ("a dog sitting on a wooden bench in red", "adds 'in red' at the end"),
    ("red a dog sitting on a wooden bench", "adds 'red' before 'A'"),
])
def test_free_prompt_that_departs_from_the_caption_says_where(target, reason):
    with pytest.raises(PromptError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        prompt_slots(rewrite_caption(CAPTION), target)


def test_colour_map_reads_as_the_caption_with_its_colours_and_builds_the_same_model_prompt_as_before():
    rewritten = rewrite_caption(CAPTION)
    color_map = {"Dog": "brown", "bench": "green"}
    assert describe_color_map(rewritten, color_map) == "A brown dog, sitting on a wooden green bench."
    assert build_target_prompt(rewritten, color_map) == "A brown dog , sks sitting on a sks wooden green bench ."
    with pytest.raises(PromptError, match="'cat' is not a content word"):
        describe_color_map(rewritten, {"cat": "red"})


# ---------------------------------------------------------------------------
# Targets resolved against the tokenizer.


def _state(models, smoke, tmp_path, gray_png):
    from diffcolor.archive.items import ItemLayout
    from diffcolor.archive.states import read_state
    from diffcolor.method.state import state_from_bytes

    out = str(tmp_path / "out")
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION), out, smoke)
    layout = ItemLayout(out)
    return state_from_bytes(read_state(layout.state), layout.state_object)


def test_targets_say_how_they_line_up(models, smoke, tmp_path, gray_png):
    state = _state(models, smoke, tmp_path, gray_png)

    aligned = resolve_target(models, state, "a brown dog sitting on a wooden bench", None)
    assert (aligned.alignment, aligned.warning) == ("aligned", None)
    assert aligned.model_prompt == "A brown dog , sks sitting on a sks wooden sks bench ."
    assert aligned.prompt == "a brown dog sitting on a wooden bench"

    mapped = resolve_target(models, state, None, {"bench": "green"})
    assert mapped.alignment == "color_map" and mapped.prompt == "A dog, sitting on a wooden green bench."

    # Another sentence, and a colour of two tokens: rendered as written, with the reason recorded.
    for target, why in (("a photo of a red car", "changes the caption's words"),
                        ("a light brown dog sitting on a wooden bench", "not token-aligned")):
        unaligned = resolve_target(models, state, target, None)
        assert unaligned.alignment == "unaligned" and unaligned.model_prompt == target
        assert why in unaligned.warning and "interpolated as written" in unaligned.warning


def test_no_identifier_token_in_any_text_people_read(models, smoke, tmp_path, gray_png):
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION,
                          targets=("a brown dog sitting on a wooden bench", "a photo of a red car"),
                          color_map={"dog": "black", "bench": "green"})
    records = colorize_item(models, request, str(tmp_path / "out"), smoke)
    assert [r["prompt_alignment"] for r in records] == ["aligned", "unaligned", "color_map"]
    assert [r["target_prompt"] for r in records] == [
        "a brown dog sitting on a wooden bench", "a photo of a red car", "A black dog, sitting on a wooden green bench."]
    assert records[1]["prompt_warning"] and not records[0]["prompt_warning"]
    # The model's prompts do carry it (that is where it belongs), so the checks below can fail.
    assert "sks" in records[0]["model_prompt"] and "sks" in records[2]["model_prompt"]

    people_read = []
    for record in records:
        people_read.append(record["target_prompt"])
        for role in ("master", "access"):
            with open(record["outputs"][role], "rb") as handle:
                fields = read_xmp(handle.read())
            assert fields["target_prompt"] == record["target_prompt"]
            people_read += [fields["description"], fields.get("title", "")]
    people_read.append(render_report(records, run_id="r1"))
    write_results(records, str(tmp_path / "results.parquet"))
    people_read += pq.read_table(tmp_path / "results.parquet").column("target_prompt").to_pylist()
    assert all("sks" not in text.lower() for text in people_read)
    assert "interpolated as written" in people_read[-4]  # the report shows the unaligned prompt's warning


# ---------------------------------------------------------------------------
# alpha (the interpolation weight) and learning rates.


def test_alpha_above_one_extrapolates_within_a_documented_range():
    low, high = ALPHA_RANGE
    assert (low, high) == (0.0, 1.5)
    assert RenderConfig(alpha=1.2).alpha == 1.2  # Imagic's SD default
    for bad in (-0.1, 1.6):
        with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.5\]"):
            RenderConfig(alpha=bad)
    from diffcolor.method.presets import get_preset

    with pytest.raises(ValueError, match="alpha must be in"):
        apply_overrides(get_preset("smoke"), {"render.alpha": 2.0})


def test_the_former_name_eta_still_sets_alpha_with_a_notice():
    from diffcolor.method.presets import PipelineConfig, get_preset

    with pytest.warns(FutureWarning, match="'render.eta' is deprecated; it is now 'render.alpha'"):
        assert apply_overrides(get_preset("smoke"), {"render.eta": 0.9}).render.alpha == 0.9
    # A configuration stored before the rename (a colour state's) reads its eta as alpha.
    stored = get_preset("smoke").to_dict()
    stored["render"] = {("eta" if key == "alpha" else key): value for key, value in stored["render"].items()}
    stored["render"]["eta"] = 1.1
    assert PipelineConfig.from_dict(stored).render.alpha == 1.1
    assert not hasattr(RenderConfig(), "eta")  # DDIM's eta is not a render setting: the sampler's is 0


def test_recolor_refuses_an_alpha_out_of_range_before_any_model_loads(models, tmp_path, gray_png, capsys, monkeypatch):
    out = tmp_path / "item"
    assert main(["colorize", str(gray_png), "--caption", CAPTION, "--model", "tiny", "--out", str(out),
                 "--preset", "smoke"]) == 0
    import diffcolor.cli as cli

    monkeypatch.setattr(cli, "_load_models", lambda *_: pytest.fail("models loaded for a refused alpha"))
    assert main(["recolor", str(out), "--target", "a brown dog", "--alpha", "1.7"]) == 2
    assert "alpha must be in [0.0, 1.5]" in capsys.readouterr().err
    # The deprecated --eta is the same setting, with a notice.
    assert main(["recolor", str(out), "--target", "a brown dog", "--eta", "1.7"]) == 2
    err = capsys.readouterr().err
    assert "--eta is deprecated, use --alpha" in err and "alpha must be in [0.0, 1.5]" in err
    assert json.loads((out / "result.json").read_text())["version"] == 1


def test_learning_rate_defaults_per_adapter_mode():
    assert DEFAULT_LEARNING_RATES == {"lora": 1e-4, "full": 2e-6}
    assert learning_rate(AdapterConfig(mode="lora"), None) == 1e-4
    assert learning_rate(AdapterConfig(mode="full"), None) == 2e-6  # 50x smaller: the whole UNet moves
    assert learning_rate(AdapterConfig(mode="full"), 5e-6) == 5e-6
    with pytest.raises(ValueError, match="must be positive"):
        learning_rate(AdapterConfig(), 0.0)


def test_each_fine_tune_uses_its_modes_learning_rate(models, smoke, tmp_path, gray_png, monkeypatch):
    import diffcolor.method.stage1 as stage1
    import diffcolor.method.stage2 as stage2

    used = []
    for module in (stage1, stage2):
        original = module.make_adamw
        monkeypatch.setattr(module, "make_adamw", lambda params, *, lr, _o=original, **kw: used.append(lr) or _o(params, lr=lr, **kw))
    config = apply_overrides(smoke, {"stage1.adapter.mode": "full", "stage2.adapter.mode": "lora",
                                     "stage2.embed_learning_rate": 3e-3})
    colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION),
                  str(tmp_path / "out"), config)
    assert used == [2e-6, 3e-3, 1e-4]  # stage 1 (full), embedding, stage 2 fine-tune (LoRA)
