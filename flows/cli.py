"""The ``diffcolor`` console command: the engine's commands plus ``run`` and ``reprocess``.

``diffcolor.cli`` holds the commands that need no orchestration (colorize,
recolor, manifest, tiny-bundle); this module adds the two that start Prefect
flows, so the engine package itself never imports Prefect. With no
``PREFECT_API_URL`` set, Prefect runs the flow against a temporary local
server: nothing to install or start beyond the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffcolor import cli as engine_cli


def _print_summary(summary: dict) -> None:
    counts = ", ".join(f"{status} {count}" for status, count in sorted(summary["counts"].items()))
    print(f"run {summary['run_id']}: {counts}")
    print(f"results: {summary['results']}")
    print(f"report:  {summary['report']}")
    if summary.get("device_seconds_per_item") is not None:
        print(f"device seconds per item: {summary['device_seconds_per_item']:.1f} (throughput of the run's devices)")
    if summary["failed_items"]:
        shown = ", ".join(summary["failed_items"][:20])
        print(f"failed items: {shown}{' ...' if len(summary['failed_items']) > 20 else ''}")


def _finish(state) -> int:
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict):
        _print_summary(summary)
        return 1 if summary["counts"].get("failed") else 0
    if isinstance(summary, BaseException):
        message = str(summary).splitlines()[0] if str(summary) else type(summary).__name__
    else:
        message = state.message or str(summary)
    print(f"diffcolor: error: {message}", file=sys.stderr)
    return 2


def _overrides(pairs: list[str] | None) -> dict:
    """``["stage1.steps=200", "render.eta=0.8"]`` -> ``{"stage1.steps": 200, "render.eta": 0.8}``."""
    overrides = {}
    for pair in pairs or ():
        field, _, text = pair.partition("=")
        if not field or not text:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[field.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field.strip()] = text
    return overrides


def cmd_run(args) -> int:
    from flows.collection import RunOptions, colorize_collection

    options = RunOptions(preset=args.preset, clip=args.clip, items=args.items.split(",") if args.items else None,
                         force=args.force, device=args.device, allow_download=args.allow_download,
                         weight_dtype=args.weight_dtype, overrides=_overrides(args.set), pool=args.pool,
                         workers_per_device=args.workers_per_device, gpus_per_item=args.gpus_per_item)
    flow_to_run = colorize_collection
    if args.pool == "ray":
        from flows.collection import ray_runner

        flow_to_run = colorize_collection.with_options(task_runner=ray_runner(args.ray_address))
    return _finish(flow_to_run(args.manifest, args.out, args.model, options, return_state=True))


def cmd_reprocess(args) -> int:
    from diffcolor.common.errors import PromptError
    from flows.reprocess import ReprocessOptions, Retarget, read_targets, reprocess

    if args.targets:
        targets = read_targets(args.targets)
    else:
        if not args.items or not (args.target or args.color_map):
            raise PromptError("give --items with --target or --color-map, or a --targets file")
        color_map = engine_cli._parse_color_map(args.color_map) or None
        targets = [Retarget(item_id=item, target_prompt=args.target, color_map=color_map) for item in args.items.split(",")]
    options = ReprocessOptions(model=args.model, clip=args.clip, device=args.device, seed=args.seed,
                               allow_download=args.allow_download, weight_dtype=args.weight_dtype,
                               workers_per_device=args.workers_per_device)
    return _finish(reprocess(args.out, targets, options, return_state=True))


def _in_range(convert, low: float, high: float, what: str):
    """An argparse type: ``convert(text)`` within ``low`` (excluded) and ``high`` (included), else a named error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low < value <= high:
            raise argparse.ArgumentTypeError(f"expects {what}, got {text!r}")
        return value

    return parse


_workers = _in_range(int, 0, float("inf"), "a whole number of at least 1")
_gpu_share = _in_range(float, 0.0, 1.0, "a GPU share above 0 and at most 1")


def _add_workers_option(parser) -> None:
    parser.add_argument("--workers-per-device", type=_workers, default=1, metavar="N",
                        help="local pool: worker processes per GPU (or on the CPU), each loading its own models; "
                             "more than 1 pays where one item's fit leaves the GPU idle (measure with "
                             "python -m diffcolor.tools.bench --concurrent N)")


def build_parser():
    parser = engine_cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")

    run = commands.add_parser("run", help="run the collection flow over a manifest (local Prefect, local device pool)")
    run.add_argument("manifest", help="Parquet manifest path or URI")
    run.add_argument("--out", required=True, help="collection output root (path or URI)")
    run.add_argument("--preset", default="default")
    run.add_argument("--items", help="comma-separated item ids to run (default: all)")
    run.add_argument("--force", action="store_true", help="redo done items; colourise colour photographs too")
    run.add_argument("--pool", choices=("local", "ray"), default="local",
                     help="local: worker processes on this machine's GPUs; ray: one GPU per item task on a Ray cluster")
    run.add_argument("--ray-address", help="Ray cluster address, e.g. ray://head:10001 (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--gpus-per-item", type=_gpu_share, default=1.0, metavar="F",
                     help="Ray only: the GPU share each item task reserves, e.g. 0.5 for two items per GPU (default 1)")
    run.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a preset field, e.g. stage1.steps=200")
    engine_cli._add_model_options(run, required=True)
    _add_workers_option(run)
    run.set_defaults(handler=cmd_run)

    again = commands.add_parser("reprocess", help="render new targets for selected items from their colour states")
    again.add_argument("out", metavar="OUTPUT", help="collection output root")
    again.add_argument("--items", help="comma-separated item ids")
    again.add_argument("--target", help="new target prompt for every selected item")
    again.add_argument("--color-map", help="JSON colour map for every selected item")
    again.add_argument("--targets", help="Parquet file of item_id, target_prompt and/or color_map")
    again.add_argument("--seed", type=int)
    engine_cli._add_model_options(again, required=False)
    _add_workers_option(again)
    again.set_defaults(handler=cmd_reprocess)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Archives run air-gapped: Prefect's usage telemetry has nowhere to go.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return engine_cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
