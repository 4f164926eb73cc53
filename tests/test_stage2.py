"""Stage 2: identifier rewrite, token alignment, and what each loop trains."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffcolor.common.captions import build_target_prompt, rewrite_caption
from diffcolor.common.errors import PromptError
from diffcolor.method.diffusion import tokenize
from diffcolor.method.stage2 import check_token_alignment, fit_in_context

CAPTION = "A dog sitting on a wooden bench, with grassland and sky"


def test_rewrite_puts_an_identifier_before_each_word_that_names_a_thing():
    rewritten = rewrite_caption(CAPTION)
    assert rewritten.text == "A sks dog sitting on a wooden sks bench , with sks grassland and sks sky"
    assert rewritten.slots == ("dog", "bench", "grassland", "sky")
    # The former rule (every content word) is still there, by name.
    former = rewrite_caption(CAPTION, rule="content")
    assert former.text == "A sks dog sks sitting on a sks wooden sks bench , with sks grassland and sks sky"


def test_colour_map_target_is_token_aligned_with_the_rewritten_caption(models):
    rewritten = rewrite_caption(CAPTION)
    target = build_target_prompt(rewritten, {"dog": "brown", "Bench": "black", "sky": "blue"})
    assert target == "A brown dog sitting on a wooden black bench , with sks grassland and blue sky"
    check_token_alignment(models, rewritten, target)
    ids = tokenize(models, [rewritten.text, target])
    identifier = int(tokenize(models, ["sks"])[0][1])
    differ = (ids[0] != ids[1]).nonzero().flatten().tolist()
    assert len(differ) == 3 and all(int(ids[0][i]) == identifier for i in differ)
    # The caption's own tokens keep their positions.
    assert models.tokenizer.convert_ids_to_tokens(ids[1][differ].tolist()) == ["brown</w>", "black</w>", "blue</w>"]


def test_colour_map_problems_are_named(models):
    rewritten = rewrite_caption(CAPTION)
    with pytest.raises(PromptError, match="'horse'"):
        build_target_prompt(rewritten, {"horse": "brown"})
    with pytest.raises(PromptError, match="token-aligned"):
        check_token_alignment(models, rewritten, build_target_prompt(rewritten, {"dog": "light red"}))
    with pytest.raises(PromptError, match="no content word"):
        rewrite_caption("on the")


def test_embedding_loop_trains_only_the_embedding_and_finetune_only_the_adapter(models, smoke):
    config = replace(smoke.stage2, embed_steps=6, finetune_steps=6, embed_learning_rate=1e-2)
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    primary = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    rewritten = rewrite_caption(CAPTION)
    result = fit_in_context(models, primary, rewritten, config, seed=0)

    from diffcolor.method.diffusion import encode_prompts

    initial = encode_prompts(models, [rewritten.text])
    assert not torch.equal(result.embedding, initial)  # e_opt moved away from c''s embedding
    assert result.embed_loop.steps_run == 6 and result.finetune_loop.steps_run == 6
    assert result.adapter and all("lora_" in key for key in result.adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in result.adapter.items() if "lora_B" in k)  # B starts at 0
    after = models.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
