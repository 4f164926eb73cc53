"""The ``diffcolor`` command line (spec section 10).

Errors that DiffColor raises on purpose (a missing model, a bad image, a bad
prompt) are printed as one line naming the problem, with exit status 2 and no
traceback; progress bars appear only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from diffcolor import __version__

SMOKE_BANNER = (
    "SMOKE RUN: random-weight tiny bundle, not a colourisation. "
    "Outputs test the pipeline only; use --model with Stable Diffusion weights for real results."
)


def _safe_item_id(name: str) -> str:
    """An item id from a file name: letters, digits, '-', '_' and '.' only."""
    item_id = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "item"
    return item_id[:128]


def _parse_color_map(text: str | None) -> dict[str, str]:
    from diffcolor.common.errors import PromptError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptError(f"--color-map is not valid JSON ({error.msg} at character {error.pos}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PromptError(f'--color-map must be a JSON object of strings, like {{"dog": "brown"}}; got {text!r}')
    return value


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class _Bars:
    """One tqdm bar per loop phase, shown only when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, phase: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=f"{phase:>9}", unit="step", leave=True, file=sys.stderr)
            bar.n = step - 1
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@contextmanager
def _bars():
    bars = _Bars(sys.stderr.isatty())
    try:
        yield bars
    finally:
        bars.close()


def _load(args, model: str):
    from diffcolor.method.models import load_models

    models = load_models(model, clip=args.clip, revision=args.revision, device=_device(args.device),
                         allow_download=args.allow_download, weight_dtype=args.weight_dtype)
    if models.random_weights:
        print(SMOKE_BANNER, file=sys.stderr)
    return models


def _print_records(records: list[dict]) -> None:
    for record in records:
        if record["status"] in ("done", "skipped_done"):
            print(
                f"{record['item_id']} v{record['version']} {record['status']}: {record['outputs'].get('master')} "
                f"(max dL* {record['max_delta_l']:.2f}, colourfulness {record['colorfulness']:.1f}, "
                f"CLIP {record['clip_score']:.1f}, fine-tune steps {record['finetune_steps_run']})"
            )
        else:
            print(f"{record['item_id']} {record['status']}: {record['error_message']}")


def cmd_tiny_bundle(args) -> int:
    from diffcolor.tools.tiny import write_tiny_bundle

    folder = write_tiny_bundle(args.dir)
    print(f"wrote the tiny random bundle to {folder} (for tests and smoke runs only)")
    return 0


def cmd_colorize(args) -> int:
    from diffcolor.archive import storage
    from diffcolor.pipeline import ItemRequest, colorize_item
    from diffcolor.method.presets import get_preset

    config = get_preset(args.preset)
    color_map = _parse_color_map(args.color_map)
    models = _load(args, args.model)
    request = ItemRequest(
        item_id=args.item_id or _safe_item_id(Path(args.image).stem),
        source_uri=args.image,
        caption=args.caption,
        targets=tuple(args.target or ()),
        color_map=color_map,
        seed=args.seed,
        force=args.force,
    )
    if not storage.exists(args.image):
        from diffcolor.common.errors import InputUnavailableError

        raise InputUnavailableError(f"input image '{args.image}' does not exist")
    with _bars() as bars:
        records = colorize_item(models, request, args.out, config, preset=args.preset, progress=bars)
    _print_records(records)
    return 0 if records[-1]["status"] in ("done", "skipped_done") else 1


def cmd_recolor(args) -> int:
    from dataclasses import replace

    from diffcolor.archive import storage
    from diffcolor.pipeline import ItemLayout, recolor_item
    from diffcolor.method.presets import PipelineConfig
    from diffcolor.method.state import load_state

    layout = ItemLayout(args.dir)
    if not storage.exists(layout.result):
        from diffcolor.common.errors import StateError

        raise StateError(f"'{args.dir}' holds no result.json: colourise the item first")
    previous = storage.read_json(layout.result)
    state = load_state(layout.state)
    config = PipelineConfig.from_dict({k: v for k, v in state.config.items() if k != "state_key"})
    render = config.render
    if args.eta is not None:
        render = replace(render, eta=args.eta)
    if args.steps is not None:
        render = replace(render, steps=args.steps)
    models = _load(args, args.model or previous["model_id"])
    record = recolor_item(models, args.dir, target=args.target, color_map=_parse_color_map(args.color_map) or None,
                          render=render, seed=args.seed, config=config)
    _print_records([record])
    return 0


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, help="Stable Diffusion folder, hub id, or 'tiny'")
    parser.add_argument("--clip", help="CLIP folder or hub id (default: the bundle's clip/ or openai/clip-vit-large-patch14)")
    parser.add_argument("--revision", help="pinned hub revision of --model")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--allow-download", action="store_true", help="let models be fetched from the hub (off by default)")
    parser.add_argument("--weight-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="storage of the frozen model weights: auto = bf16 on CUDA (the fast path), fp32 elsewhere; "
                             "fp32 on a GPU for runs whose presets set autocast off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcolor", description="Text-guided colourisation of archival photographs (DiffColor).")
    parser.add_argument("--version", action="version", version=f"diffcolor-archive {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-bundle", help="write the tiny random model bundle (tests and smoke runs only)")
    tiny.add_argument("dir")
    tiny.set_defaults(handler=cmd_tiny_bundle)

    colorize = commands.add_parser("colorize", help="colourise one image")
    colorize.add_argument("image", help="path or URI of the gray source (never written)")
    colorize.add_argument("--caption", required=True, help="catalogue caption: the context prompt")
    colorize.add_argument("--target", action="append", help="a target prompt; repeat for several (one version each)")
    colorize.add_argument("--color-map", help='JSON object of caption word to colour, e.g. \'{"dog": "brown"}\'')
    colorize.add_argument("--out", required=True, help="item output folder or URI")
    colorize.add_argument("--preset", default="default", help="smoke, default or paper-scale")
    colorize.add_argument("--seed", type=int, default=0)
    colorize.add_argument("--item-id", help="item id (default: from the file name)")
    colorize.add_argument("--force", action="store_true", help="colourise a colour photograph too")
    _add_model_options(colorize, required=True)
    colorize.set_defaults(handler=cmd_colorize)

    recolor = commands.add_parser("recolor", help="render a new target from an item's stored colour state")
    recolor.add_argument("dir", help="the item folder or URI written by colorize")
    recolor.add_argument("--target", help="the new target prompt")
    recolor.add_argument("--color-map", help="JSON colour map instead of --target")
    recolor.add_argument("--eta", type=float, help="interpolation weight of the target embedding")
    recolor.add_argument("--steps", type=int, help="DDIM steps (default: the item's preset)")
    recolor.add_argument("--seed", type=int, help="default: the item's seed")
    _add_model_options(recolor, required=False)
    recolor.set_defaults(handler=cmd_recolor)

    from diffcolor.archive.manifest import add_manifest_commands

    add_manifest_commands(commands)
    from diffcolor.tools.evaluate import add_eval_commands

    add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs the command line; ``parser`` lets the orchestration layer add its commands."""
    from diffcolor.common.errors import DiffColorError

    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.handler(args)
    except (DiffColorError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"diffcolor: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffcolor: interrupted; a rerun resumes from the latest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
