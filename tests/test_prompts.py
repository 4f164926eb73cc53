"""Prompts for people and prompts for the model; free prompts aligned to the caption; alpha and learning rates."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from diffcolor.archive.metadata import read_xmp
from diffcolor.archive.report import render_report
from diffcolor.archive.results import write_results
from diffcolor.cli import main
from diffcolor.common.captions import (
    WORD_PATTERN,
    RewrittenCaption,
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
    assert rewritten.text == "A sks dog , sitting on a wooden sks bench ."
    # Case, spacing and punctuation of the target do not matter; the model's prompt keeps the caption's.
    colors = prompt_slots(rewritten, "a brown dog sitting on a wooden green bench")
    assert colors == {0: "brown", 1: "green"}
    assert slot_prompt(rewritten, colors) == "A brown dog , sitting on a wooden green bench ."
    # For people the colour goes where English puts it: before a material adjective.
    assert colored_caption(rewritten, colors) == "A brown dog, sitting on a green wooden bench."


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
    assert describe_color_map(rewritten, color_map) == "A brown dog, sitting on a green wooden bench."
    assert build_target_prompt(rewritten, color_map) == "A brown dog , sitting on a wooden green bench ."
    with pytest.raises(PromptError, match="'cat' is not a content word"):
        describe_color_map(rewritten, {"cat": "red"})


@pytest.mark.parametrize("caption, color_map, described", [
    ("A spacesuit on a stand", {"spacesuit": "orange"}, "An orange spacesuit on a stand"),
    ("An apple on a plate", {"apple": "red"}, "A red apple on a plate"),
    ("an old car", {"car": "orange"}, "an old orange car"),  # the article agrees with "old", unchanged
    ("a dog on a grass field", {"field": "yellow"}, "a dog on a yellow grass field"),  # not "a grass yellow field"
    ("a grass field", {"grass": "green", "field": "yellow"}, "a green grass yellow field"),
    ("a French car, a bench", {"car": "ivory", "bench": "umber"}, "an ivory French car, an umber bench"),
    ("a jug", {"jug": "ultramarine"}, "an ultramarine jug"),
])
def test_colour_map_prompt_for_people_is_good_english(caption, color_map, described):
    assert describe_color_map(rewrite_caption(caption), color_map) == described


def test_a_target_whose_article_agrees_with_its_colour_is_understood():
    rewritten = rewrite_caption("A spacesuit on a stand")
    assert prompt_slots(rewritten, "an orange spacesuit on a stand") == {0: "orange"}
    assert slot_prompt(rewritten, {0: "orange"}) == "A orange spacesuit on a sks stand"  # the model's slots


# The identifier rule: identifiers before the words that name things (diffcolor.common.captions).

# The demo and evaluation captions (manifests/demo.parquet, manifests/eval-demo.parquet) and their slots.
RULE_CASES = [
    ("a man in a coat filming with a camera on a tripod on a grass field, with buildings and sky behind",
     ("man", "coat", "camera", "tripod", "grass", "field", "buildings", "sky")),
    ("a smiling astronaut in a spacesuit holding a helmet, beside a flag and a model space shuttle",
     ("astronaut", "spacesuit", "helmet", "flag", "model", "space", "shuttle")),
    ("a close-up of a tabby cat with striped fur, large eyes, long whiskers and a small nose",
     ("close-up", "tabby", "cat", "fur", "eyes", "whiskers", "nose")),
    ("a cup of espresso on a saucer with a spoon, on a wooden table", ("cup", "espresso", "saucer", "spoon", "table")),
    ("a rocket on a launch pad between lattice towers with lights, under an evening sky",
     ("rocket", "launch", "pad", "lattice", "towers", "lights", "evening", "sky")),
    ("ancient greek coins with heads and figures, laid out in rows on a cloth",
     ("coins", "heads", "figures", "rows", "cloth")),
    ("a smiling astronaut in an orange spacesuit holding a white helmet, beside an american flag and a model space "
     "shuttle", ("astronaut", "spacesuit", "helmet", "flag", "model", "space", "shuttle")),
    ("a close-up of a tabby cat with ginger striped fur, green eyes, white whiskers and a pink nose",
     ("close-up", "tabby", "cat", "fur", "eyes", "whiskers", "nose")),
    ("a red cup of espresso on a red saucer with a silver spoon, on a brown wooden table",
     ("cup", "espresso", "saucer", "spoon", "table")),
    ("a white rocket on a launch pad between gray lattice towers with orange lights, under a deep blue evening sky",
     ("rocket", "launch", "pad", "lattice", "towers", "lights", "evening", "sky")),
    # Tests' and tools' captions.
    ("A man standing with a camera, with grassland and sky", ("man", "camera", "grassland", "sky")),
    ("a dog sitting on a wooden bench", ("dog", "bench")),
    # Verbs that are also nouns: a verb after a noun, a noun after a determiner or preposition.
    ("a man faces the sea wearing a watch", ("man", "sea", "watch")),
    ("two faces at a window, with drinks on a stand", ("faces", "window", "drinks", "stand")),
    # A colour that is also a thing; names keep their slot whatever their ending; -ing nouns; hyphenated adjectives.
    ("an orange on a plate beside an orange cloth", ("orange", "plate", "cloth")),
    ("a portrait of Alfred and Mildred at the wedding in the evening",
     ("portrait", "alfred", "mildred", "wedding", "evening")),
    ("a sepia-toned black-and-white portrait of a well-dressed family", ("portrait", "family")),
]


@pytest.mark.parametrize("caption, slots", RULE_CASES, ids=[case[0][:40] for case in RULE_CASES])
def test_identifiers_go_before_the_words_that_name_things(caption, slots):
    rewritten = rewrite_caption(caption)
    assert rewritten.slots == slots
    # Each identifier stands right before its word, and c' is the caption with nothing else added.
    pieces = rewritten.text.split(" ")
    assert [pieces[i + 1].lower() for i, piece in enumerate(pieces) if piece == "sks"] == list(slots)
    assert " ".join(piece for piece in pieces if piece != "sks") == " ".join(WORD_PATTERN.findall(caption))


def test_the_demo_caption_loses_its_identifiers_on_verbs_and_adjectives():
    caption = RULE_CASES[1][0]
    before, after = rewrite_caption(caption, rule="content"), rewrite_caption(caption)
    assert {"smiling", "holding"} <= set(before.slots) and not {"smiling", "holding"} & set(after.slots)
    assert len(after.slots) < len(before.slots)


def test_every_demo_and_eval_colour_map_names_words_that_take_a_colour():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "manifests"
    checked = 0
    for name in ("demo.parquet", "eval-demo.parquet"):
        for row in pq.read_table(root / name).to_pylist():
            rewritten = rewrite_caption(row["caption"])
            if row.get("color_map"):
                build_target_prompt(rewritten, dict(row["color_map"]))
                checked += 1
    assert checked >= 4


def test_a_colour_map_key_that_names_no_thing_is_refused_naming_the_words_that_can_take_one():
    rewritten = rewrite_caption(RULE_CASES[1][0])
    with pytest.raises(PromptError) as refused:
        build_target_prompt(rewritten, {"smiling": "red"})
    message = str(refused.value)
    assert "'smiling' is in the caption but names no thing" in message
    assert "'astronaut', 'spacesuit', 'helmet', 'flag', 'model', 'space', 'shuttle'" in message
    with pytest.raises(PromptError, match="no word that names a thing.*'smiling'"):
        rewrite_caption("smiling and waving")


def test_a_stored_rewrite_keeps_its_own_slots_whatever_the_rule_now_says():
    # A colour state fitted under the former rule: its c' has identifiers before verbs and adjectives too.
    former = rewrite_caption(CAPTION, rule="content")
    stored = RewrittenCaption.stored(former.caption, former.text)
    assert stored.slots == former.slots == ("dog", "sitting", "wooden", "bench")
    assert build_target_prompt(stored, {"bench": "green"}) == "A sks dog , sks sitting on a sks wooden green bench ."
    assert slot_prompt(stored, prompt_slots(stored, "a dog sitting on a red wooden bench")) == (
        "A sks dog , sks sitting on a red wooden sks bench .")
    # A caption that contains the identifier itself: only the inserted ones are slots.
    odd = rewrite_caption("a sks dog on a bench")
    assert odd.text == "a sks sks dog on a sks bench" and RewrittenCaption.stored(odd.caption, odd.text).slots == odd.slots


# ---------------------------------------------------------------------------
# Never truncate silently: every model prompt must fit the text encoder.

# 59 words of an archival caption, all in the tiny vocabulary: 66 tokens as written, 88 with identifiers.
LONG_CAPTION = ("an old photograph of a street in a town with a church and a tower near a river, a bridge over the river, "
                "a house with a garden and flowers, a man and a woman with a child near a car, a horse near a tree, "
                "a boat on the lake, a bench near the wall, and the sky")


def test_a_caption_that_fits_as_written_but_not_with_its_identifiers_is_refused_naming_the_lost_words(models):
    from diffcolor.common.captions import prompt_length_problems
    from diffcolor.method.models import prompt_limit

    limit = prompt_limit(models.tokenizer)
    assert len(LONG_CAPTION.split()) == 59 and len(models.tokenizer.tokenize(LONG_CAPTION)) <= limit.limit
    rewritten = rewrite_caption(LONG_CAPTION)
    assert len(models.tokenizer.tokenize(rewritten.text)) > limit.limit
    problems = dict(prompt_length_problems(limit, rewritten, {"sky": "blue"}, ["a red car"]))
    assert set(problems) == {"caption", "color_map"}  # the short free target fits
    assert problems["caption"].startswith("the caption with its identifiers is ")
    assert "over the text encoder's 77" in problems["caption"] and "the sky' would be cut off" in problems["caption"]
    assert "sks" not in problems["caption"]  # people never see the identifier
    assert "colours lost: 'blue' (for 'sky')" in problems["color_map"] and "blue sky" in problems["color_map"]
    # Without the identifiers' cost (the former rule costs more) nothing is reported for a short caption.
    assert prompt_length_problems(limit, rewrite_caption(CAPTION), {"dog": "brown"}, ["a brown dog"]) == []


def test_the_pipeline_refuses_an_over_long_prompt_before_any_model_work(models, smoke, tmp_path, gray_png, monkeypatch):
    import diffcolor.pipeline as pipeline

    monkeypatch.setattr(pipeline, "fit_color_prior", lambda *_, **__: pytest.fail("fitted a caption that is cut off"))
    request = ItemRequest(item_id="long", source_uri=str(gray_png), caption=LONG_CAPTION, color_map={"sky": "blue"})
    with pytest.raises(PromptError) as refused:
        colorize_item(models, request, str(tmp_path / "out"), smoke)
    assert "would be cut off" in str(refused.value) and "'blue' (for 'sky')" in str(refused.value)
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["status"] == "failed" and record["error_message"] == str(refused.value)
    # A free target that is too long as written is refused too (it would be rendered as written, cut off).
    long_target = " ".join(["a red car near a blue house"] * 12)
    request = ItemRequest(item_id="long-target", source_uri=str(gray_png), caption=CAPTION, targets=(long_target,))
    with pytest.raises(PromptError, match="target prompt 1 is .* would be cut off"):
        colorize_item(models, request, str(tmp_path / "out2"), smoke)


def test_manifest_validate_with_the_model_names_the_row_and_the_lost_words(models, tmp_path, capsys):
    import pyarrow as pa

    for name in ("a.png", "b.png"):  # the images exist (manifest validate checks local sources)
        (tmp_path / name).write_bytes(b"\x89PNG")
    table = pa.table({"item_id": ["ok", "long"], "image_uri": ["a.png", "b.png"],
                      "caption": [CAPTION, LONG_CAPTION], "color_map": ['{"dog": "brown"}', '{"sky": "blue"}']})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    assert main(["manifest", "validate", str(path)]) == 0  # without a model: lengths are not known
    assert "prompt lengths not checked: give --model" in capsys.readouterr().out
    assert main(["manifest", "validate", str(path), "--model", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "row 2, column 'caption': the caption with its identifiers is" in out and "would be cut off" in out
    assert "row 2, column 'color_map'" in out and "'blue' (for 'sky')" in out and "row 1" not in out


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
    assert aligned.model_prompt == "A brown dog , sitting on a wooden sks bench ."
    assert aligned.prompt == "a brown dog sitting on a wooden bench"

    mapped = resolve_target(models, state, None, {"bench": "green"})
    assert mapped.alignment == "color_map" and mapped.prompt == "A dog, sitting on a green wooden bench."

    # Another sentence, and a colour of two tokens: rendered as written, with the reason recorded.
    for target, why in (("a photo of a red car", "changes the caption's words"),
                        ("a light brown dog sitting on a wooden bench", "not token-aligned")):
        unaligned = resolve_target(models, state, target, None)
        assert unaligned.alignment == "unaligned" and unaligned.model_prompt == target
        assert why in unaligned.warning and "interpolated as written" in unaligned.warning


def test_no_identifier_token_in_any_text_people_read(models, smoke, tmp_path, gray_png):
    request = ItemRequest(item_id="bench", source_uri=str(gray_png), caption=CAPTION,
                          targets=("a brown dog sitting on a wooden bench", "a photo of a red car"),
                          color_map={"dog": "black"})
    records = colorize_item(models, request, str(tmp_path / "out"), smoke)
    assert [r["prompt_alignment"] for r in records] == ["aligned", "unaligned", "color_map"]
    assert [r["target_prompt"] for r in records] == [
        "a brown dog sitting on a wooden bench", "a photo of a red car", "A black dog, sitting on a wooden bench."]
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
    # The report's text (its embedded thumbnails are base64, where any three letters turn up by chance).
    people_read.append(re.sub(r"data:image/[A-Za-z]+;base64,[A-Za-z0-9+/=]+", "", render_report(records, run_id="r1")))
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
