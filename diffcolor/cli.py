"""The ``diffcolor`` command line (docs/DESIGN.md §10): every command, in one place.

Building the parser imports nothing heavy: each command's handler imports
what it needs when it runs, so ``diffcolor --help``, every ``--help`` and the
``manifest`` commands never load torch, diffusers or Prefect. ``run`` and
``reprocess`` start the Prefect flows of ``flows/``; this module is the only
place in ``diffcolor/`` that reaches them, and only from those two handlers.

Errors that DiffColor raises on purpose (a missing model, a bad image, a bad
prompt, a bad ``--set``: :class:`~diffcolor.common.errors.UserError` and the
other ``DiffColorError`` classes) are printed as one line naming the problem,
with exit status 2 and no traceback. Any other exception is a bug: its
traceback is shown, with where to report it, and the exit status is 1.
Progress bars appear only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from diffcolor import __version__
from diffcolor.common.errors import UserError

SMOKE_BANNER = (
    "SMOKE RUN: random-weight tiny bundle, not a colourisation. "
    "Outputs test the pipeline only; use --model with Stable Diffusion weights for real results."
)
# The preset names of diffcolor.method.presets.PRESETS, spelt out so that building the parser imports no
# torch (tests/test_cli.py checks that the two agree).
PRESET_NAMES = ("smoke", "default", "paper-scale")
EVAL_MAX_SIDE = 1024  # the default of diffcolor.tools.evaluate.EvalConfig.max_side, for --help (checked by a test)
SOURCE_LIMIT_MIB, SOURCE_LIMIT_SECONDS = 2048, 600  # diffcolor.archive.storage.ReadLimits' defaults, for --help


# ---------------------------------------------------------------------------
# Shared pieces of the handlers.


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


def _parse_overrides(pairs: list[str] | None) -> dict:
    """``["stage1.steps=200", "render.alpha=0.8"]`` -> ``{"stage1.steps": 200, "render.alpha": 0.8}`` (JSON values, else text)."""
    overrides = {}
    for pair in pairs or ():
        field, _, text = pair.partition("=")
        if not field.strip() or not text:
            raise UserError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[field.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field.strip()] = text
    return overrides


def _configured(args, config=None):
    """The configuration a command works with: ``config`` (default: the ``--preset``) with every ``--set``
    applied and type-checked against the preset's dataclasses before any work starts (UserError naming an
    unknown field or a bad value); and the overrides themselves, for the flows."""
    from diffcolor.method.presets import apply_overrides, get_preset

    overrides = _parse_overrides(args.set)
    return apply_overrides(get_preset(args.preset) if config is None else config, overrides), overrides


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
        if not self.enabled or phase == "read":  # "read" gives the source's size, not a loop
            return
        from tqdm.auto import tqdm

        self._end_stepless(but=phase)
        bar = self.bars.get(phase)
        if bar is not None and step < bar.n:  # the phase again (the next version's merge): a new bar
            bar.close()
            bar = None
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=f"{phase:>9}", unit="step", leave=True, file=sys.stderr)
            bar.n = step - 1
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    def _end_stepless(self, but: str | None = None) -> None:
        """Fills the bar of a phase with no steps of its own (an encode: 0 of 1) once another phase begins."""
        for phase, bar in self.bars.items():
            if phase != but and bar.total == 1 and bar.n < 1:
                bar.update(1)
                bar.close()

    def close(self) -> None:
        self._end_stepless()
        for bar in self.bars.values():
            bar.close()


@contextmanager
def _bars():
    bars = _Bars(sys.stderr.isatty())
    try:
        yield bars
    finally:
        bars.close()


def _load_models(args, model: str):
    """The models named on the command line (a folder, a hub id or ``tiny``), with the SMOKE RUN banner for random weights."""
    from diffcolor.method.model_names import load_named_models

    models = load_named_models(model, clip=args.clip, revision=args.revision, device=_device(args.device),
                               allow_download=args.allow_download, weight_dtype=args.weight_dtype)
    if models.random_weights:
        print(SMOKE_BANNER, file=sys.stderr)
    return models


def _print_records(records: list[dict]) -> None:
    from diffcolor.common.record import summary_line

    for record in records:
        if record["status"] in ("done", "skipped_done"):
            print(f"{record['item_id']} v{record['version']} {record['status']}: {record['outputs'].get('master')} "
                  f"({summary_line(record)})")
        else:
            print(f"{record['item_id']} {record['status']}: {record['error_message']}")


def _signing():
    """The operator's content-credentials key, or None with a plain notice that outputs will be unsigned."""
    from diffcolor.archive.credentials import signing_from_environment

    signing = signing_from_environment()
    if signing is None:
        print("content credentials: none, outputs are unsigned (set DIFFCOLOR_C2PA_CERT and DIFFCOLOR_C2PA_KEY to "
              "sign them; deploy/README.md)", file=sys.stderr)
    return signing


def _smoke_notice(model: str) -> None:
    """The SMOKE RUN banner on stderr when ``model`` is a random-weight bundle on this machine (checked cheaply)."""
    from diffcolor.method.model_names import TINY, resolve_model
    from diffcolor.method.models import TINY_MARKER

    folder = Path(resolve_model(model)).expanduser() if model == TINY or Path(model).expanduser().is_dir() else None
    if folder is not None and (folder / TINY_MARKER).exists():
        print(SMOKE_BANNER, file=sys.stderr)


def _print_summary(summary: dict) -> None:
    from diffcolor.archive.layout import RESULTS_CSV
    from diffcolor.archive.report import describe_counts

    print(f"run {summary['run_id']}: {describe_counts(summary.get('items', {}), summary.get('versions_written', 0))}")
    print(f"results: {summary['results']} (and {summary.get('results_csv', RESULTS_CSV)} for spreadsheets)")
    print(f"report:  {summary['report']}")
    if summary.get("redone_missing"):
        print(f"redone (missing from the archive though the done-index listed them) {summary['redone_missing']}: "
              + ", ".join(summary["redone_missing_items"][:20]) + (" ..." if summary["redone_missing"] > 20 else ""))
    if summary.get("smoke"):
        print(SMOKE_BANNER)
    if summary.get("device_seconds_per_item") is not None:
        print(f"device seconds per item: {summary['device_seconds_per_item']:.1f} (throughput of the run's devices)")
    if summary["failed_items"]:
        shown = ", ".join(summary["failed_items"][:20])
        print(f"failed items: {shown}{' ...' if len(summary['failed_items']) > 20 else ''}")


def _finish_flow(state) -> int:
    """The exit status of a finished flow run: 0 all done, 1 some items failed, 2 the run itself failed (refused),
    130 or 143 stopped by SIGINT or SIGTERM (its record says which items finished)."""
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict) and summary.get("interrupted"):
        from flows.stopping import exit_code

        finished = sum(summary.get("items", {}).values())
        print(f"diffcolor: interrupted by {summary['signal']}: run {summary['run_id']} stopped, {finished} item(s) "
              f"finished and recorded in {summary['summary']}; a rerun resumes the rest", file=sys.stderr)
        return exit_code()
    if isinstance(summary, dict):
        _print_summary(summary)
        return 1 if summary["counts"].get("failed") else 0
    if isinstance(summary, BaseException):
        if not _is_refusal(summary):
            raise summary  # the flow crashed: a bug, whose traceback main() shows
        message = str(summary).splitlines()[0] if str(summary) else type(summary).__name__
    else:
        message = state.message or str(summary)
    print(f"diffcolor: error: {message}", file=sys.stderr)
    return 2


def _is_refusal(error: BaseException) -> bool:
    """Whether a failed flow's result is a refusal (an error raised on purpose, or Prefect's stand-in for the
    one-line message flows.runs.refusal gives the run) rather than the exception of a crashed flow."""
    from diffcolor.common.errors import DiffColorError

    return isinstance(error, DiffColorError) or type(error).__module__.split(".")[0] == "prefect"


@contextmanager
def _following_runs():
    """Progress of the flows this process runs: rich bars on a terminal, plain lines otherwise (stderr)."""
    from flows.progress import make_display
    from flows.runs import PROGRESS_LISTENERS

    display = make_display(sys.stderr)
    PROGRESS_LISTENERS.append(display)
    try:
        yield display
    finally:
        PROGRESS_LISTENERS.remove(display)
        display.close()


def _source_limits(args) -> dict:
    """The source limits given on the command line, as flow options (the flows' own defaults otherwise)."""
    given = {"max_source_mb": args.max_source_mb, "source_timeout_seconds": args.source_timeout}
    return {name: value for name, value in given.items() if value is not None}


def _lift_credentials(*uris: str | None) -> list[str | None]:
    """The URIs without user-info; S3 credentials written in them become this run's AWS credentials.

    A flow's parameters are stored by Prefect with the run, so credentials must
    never be among them: ``s3://KEY:SECRET@bucket/...`` is passed on as
    ``s3://bucket/...`` and KEY/SECRET go into this process's environment
    (inherited by the pool's workers). Raises UserError for credentials in any
    other kind of URI, or two different S3 credentials in one command. What
    counts as credentials (a secret holding ``/``, ``@``, ``:``, ...):
    :func:`diffcolor.common.redact.userinfo_span`.
    """
    from diffcolor.common.redact import redact, split_userinfo

    clean, found = [], set()
    for uri in uris:
        if uri is None:
            clean.append(None)
            continue
        bare, user, password = split_userinfo(uri)
        if user is not None:
            if not bare.startswith(("s3://", "s3a://")):
                raise UserError(f"'{redact(uri)}' carries credentials; give them to its store in the environment "
                                "(a .netrc for http) instead: a run's URIs are stored with the run")
            found.add((user, password))
        clean.append(bare)
    if len(found) > 1:
        raise UserError("the URIs carry two different S3 credentials; set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY in the environment instead")
    for user, password in found:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = user, password or ""
    return clean


def _quiet_prefect() -> None:
    # Archives run air-gapped: Prefect's usage telemetry off (server and client), before Prefect is imported.
    from flows.local import prepare_environment

    prepare_environment()


def _preflight(model: str | None, out: str, args) -> None:
    """The checks of a run that need no Prefect: the model as ``diffcolor doctor`` checks it (no hashes) and
    a write probe of the output; each refuses the run with one line before Prefect starts or a model loads."""
    from flows.checks import check_output_writable

    if model:
        from diffcolor.method.doctor import preflight_model

        preflight_model(model, clip=args.clip, allow_download=args.allow_download,
                        device="auto" if getattr(args, "pool", None) == "ray" else args.device,
                        weight_dtype=args.weight_dtype, hashes=False, probe_memory=False)
    check_output_writable(out)


# ---------------------------------------------------------------------------
# Handlers, one per command.


def cmd_tiny_bundle(args) -> int:
    from diffcolor.method.tiny import write_tiny_bundle

    folder = write_tiny_bundle(args.dir)
    print(f"wrote the tiny random bundle to {folder} (for tests and smoke runs only)")
    return 0


def cmd_doctor(args) -> int:
    """``diffcolor doctor MODEL``: the model checked offline without loading it; exit 0 when no problem, else 1."""
    from diffcolor.archive import storage
    from diffcolor.method.doctor import check_model, format_report

    report = check_model(args.model, clip=args.clip, revision=args.revision, device=args.device,
                         weight_dtype=args.weight_dtype, captions=args.caption or ())
    # With --json - the JSON is stdout's alone and the text report goes to stderr.
    print(format_report(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(storage.strict_json(report.to_dict(), indent=2))
    elif args.json:
        storage.write_json(args.json, report.to_dict())
    return 0 if report.ok else 1


def cmd_colorize(args) -> int:
    from diffcolor.archive import storage
    from diffcolor.common.captions import build_target_prompt, rewrite_caption
    from diffcolor.common.errors import InputUnavailableError
    from diffcolor.common.ids import normalize_item_id, safe_item_id
    from diffcolor.common.items import ItemRequest
    from diffcolor.pipeline import colorize_item

    # 1. Every argument checked before any model loads (the colour map's words against the caption's too).
    config, _ = _configured(args)
    color_map = _parse_color_map(args.color_map)
    rewritten = rewrite_caption(args.caption, config.stage2.identifier, config.stage2.identifier_rule)
    if color_map:
        build_target_prompt(rewritten, color_map)
    item_id = normalize_item_id(args.item_id) if args.item_id else safe_item_id(Path(args.image).stem)
    image, out = (storage.absolute(uri) for uri in _lift_credentials(args.image, args.out))
    if not storage.exists(image):
        raise InputUnavailableError(f"input image '{image}' does not exist")

    signing = _signing()

    # 2. Models, then the item.
    models = _load_models(args, args.model)
    request = ItemRequest(item_id=item_id, source_uri=image, caption=args.caption,
                          targets=tuple(args.target or ()), color_map=color_map, seed=args.seed, force=args.force)
    with _bars() as bars:
        records = colorize_item(models, request, out, config, preset=args.preset, progress=bars, signing=signing)
    _print_records(records)
    return 0 if records[-1]["status"] in ("done", "skipped_done") else 1


def cmd_recolor(args) -> int:
    from dataclasses import replace

    from diffcolor.archive import storage
    from diffcolor.archive.layout import ItemLayout
    from diffcolor.archive.states import read_state
    from diffcolor.common.errors import StateError
    from diffcolor.method.presets import PipelineConfig
    from diffcolor.method.state import state_from_bytes
    from diffcolor.pipeline import recolor_item, stored_config

    # 1. The arguments (--set against the configuration's fields first), the item and its colour state, before
    #    any model loads.
    _configured(args, PipelineConfig())
    layout = ItemLayout(args.dir)
    if not storage.exists(layout.result):
        raise StateError(f"'{args.dir}' holds no result.json: colourise the item first")
    previous = storage.read_json(layout.result)
    color_map = _parse_color_map(args.color_map) or None
    config, _ = _configured(args, stored_config(state_from_bytes(read_state(layout.state), layout.state_object)))
    render = config.render
    if args.eta is not None:
        print("diffcolor: --eta is deprecated, use --alpha (the embedding interpolation weight; DDIM's eta stays 0)",
              file=sys.stderr)
        if args.alpha is not None and args.alpha != args.eta:
            raise UserError(f"--alpha {args.alpha} and --eta {args.eta} disagree; give --alpha only")
        args.alpha = args.eta
    if args.alpha is not None:
        render = replace(render, alpha=args.alpha)
    if args.steps is not None:
        render = replace(render, steps=args.steps)

    signing = _signing()

    # 2. Models, then the render.
    models = _load_models(args, args.model or previous["model_id"])
    record = recolor_item(models, args.dir, target=args.target, color_map=color_map, render=render, seed=args.seed,
                          config=config, signing=signing)
    _print_records([record])
    return 0


def _print_problems(problems: list, verdict: str) -> int:
    """One line per manifest problem, then the verdict; the exit status of a refused manifest (1)."""
    for problem in problems:
        print(problem)
    print(verdict)
    return 1


def _manifest_checks(args):
    """What ``manifest build`` and ``validate`` check beyond the cells: sources (remote ones with --check-sources)
    and near-miss column names (problems with --strict)."""
    from diffcolor.archive.manifest import ManifestChecks

    return ManifestChecks(sources="all" if args.check_sources else "local", strict=args.strict)


def _print_warnings(checks) -> None:
    for warning in checks.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_manifest_build(args) -> int:
    """``diffcolor manifest build``: writes the manifest, or prints every problem and exits 1."""
    from diffcolor.archive.builders import (
        build_from_csv,
        build_from_folder,
    )
    from diffcolor.archive.iiif import read_iiif, read_info_json
    from diffcolor.archive.manifest import ManifestError, problem_count, write_manifest

    checks = _manifest_checks(args)

    if args.captions and not args.from_folder:
        raise UserError("--captions goes with --from-folder only")
    if (args.language or args.image_info) and not args.from_iiif:
        raise UserError("--language and --image-info go with --from-iiif only")
    args.from_folder, args.captions, args.from_csv, args.from_iiif, args.out, *args.image_info = _lift_credentials(
        args.from_folder, args.captions, args.from_csv, args.from_iiif, args.out, *(args.image_info or ()))
    try:
        if args.from_folder:
            table = build_from_folder(args.from_folder, captions=args.captions, checks=checks)
        elif args.from_csv:
            table = build_from_csv(args.from_csv, checks=checks)
        else:
            image_info = {base: info for uri in args.image_info or () for base, info in read_info_json(uri).items()}
            imported = read_iiif(args.from_iiif, language=args.language, image_info=image_info, checks=checks)
            for problem in imported.left_out:  # one line per canvas that gave no row; the others are written
                print(problem, file=sys.stderr)
            table = imported.table
        write_manifest(table, args.out)
    except ManifestError as error:
        _print_warnings(checks)
        return _print_problems(error.problems,
                               f"diffcolor: manifest not written: {problem_count(error.problems)} problem(s) in '{error.uri}'")
    _print_warnings(checks)
    print(f"wrote {table.num_rows} items to {args.out}")
    return 0


def cmd_manifest_validate(args) -> int:
    """``diffcolor manifest validate``: exit 0 and one OK line, or one line per problem and exit 1."""
    from diffcolor.archive.manifest import count_rows, problem_count, validate_manifest

    args.file = _lift_credentials(args.file)[0]
    limit = None
    if args.model:
        from diffcolor.method.model_names import named_prompt_limit

        limit = named_prompt_limit(args.model, revision=args.revision, allow_download=args.allow_download)
    checks = _manifest_checks(args)
    problems = validate_manifest(args.file, prompt_limit=limit, checks=checks)
    _print_warnings(checks)
    if problems:
        return _print_problems(
            problems, f"{args.file}: INVALID, {problem_count(problems)} problem(s); nothing may run on this manifest")
    unchecked = "" if limit else " (prompt lengths not checked: give --model to check them against its text encoder)"
    print(f"{args.file}: OK, {count_rows(args.file)} items{unchecked}")
    return 0


def cmd_iiif(args) -> int:
    """``diffcolor iiif``: writes the IIIF manifest of the approved (``--unreviewed``: and latest done) versions."""
    from diffcolor.archive.iiif_publish import publish_iiif

    output, base_url = _lift_credentials(args.output, args.base_url)  # the base URL is published: no credentials
    if base_url != args.base_url:
        raise UserError("--base-url is published in the manifest: it may carry no credentials")
    publication = publish_iiif(output, base_url, args.out, label=args.label, unreviewed=args.unreviewed)
    for reason in publication.left_out:
        print(f"left out: {reason}", file=sys.stderr)
    print(f"wrote a IIIF manifest of {len(publication.items)} items: {publication.manifest['id']}")
    return 0


def cmd_run(args) -> int:
    from diffcolor.archive import storage
    from diffcolor.common.redact import refuse_credentials
    from diffcolor.archive.manifest import problem_count, read_manifest, validate_manifest
    from flows.checks import Checked

    # 1. The preset and its overrides, type-checked before any work starts; credentials out of the URIs;
    #    the manifest's every problem listed (as `manifest validate` does) before any flow or model starts.
    #    The manifest read and the configuration resolved here are the flow's (read and applied once).
    config, overrides = _configured(args)
    manifest, out = (storage.absolute(uri) for uri in _lift_credentials(args.manifest, args.out))
    refuse_credentials(args.model, args.clip, what="--model/--clip")  # flow parameters, stored by Prefect
    from diffcolor.common.errors import ModelNotFoundError
    from diffcolor.method.model_names import named_prompt_limit

    try:  # prompt lengths against the model's tokenizer; a missing model is the preflight's to report
        limit = named_prompt_limit(args.model, revision=args.revision, allow_download=args.allow_download)
    except ModelNotFoundError:
        limit = None
    source = read_manifest(manifest)
    problems = validate_manifest(source, prompt_limit=limit)
    if not problems and args.items:  # unsafe or unknown --items ids, listed the same way
        from diffcolor.archive.manifest import ManifestError, read_items

        try:
            read_items(source, items=set(args.items.split(",")))
        except ManifestError as error:
            problems = error.problems
    if problems:
        return _print_problems(problems, f"diffcolor: nothing run: {problem_count(problems)} problem(s) in "
                                         f"'{manifest}'")
    _preflight(args.model, out, args)
    _smoke_notice(args.model)
    _signing()
    print(f"run: {_selected_count(source, args.items)} of {manifest} -> {out} (model {args.model}, "
          f"preset {args.preset})", file=sys.stderr)  # the URIs without credentials

    # 2. The collection flow (a private temporary Prefect server unless PREFECT_API_URL names one); SIGINT or
    #    SIGTERM stops it within seconds, with a record of the items finished (flows/stopping.py).
    _quiet_prefect()
    from flows.local import LocalPrefect
    from flows.stopping import handling_signals

    with handling_signals(), LocalPrefect():
        return _run_collection(args, manifest, out, overrides, Checked(source, args.preset, overrides, config))


def _selected_count(source, items: str | None) -> str:
    """"9 items" (``source``: the manifest as read once), or with ``--items`` the distinct ids it selects:
    "4 items (selected by --items)"."""
    from diffcolor.archive.manifest import count_rows
    from diffcolor.common.ids import normalize_item_id

    if not items:
        count = count_rows(source)
        return f"{count} item{'' if count == 1 else 's'}"
    count = len({normalize_item_id(item) for item in items.split(",")})
    return f"{count} item{'' if count == 1 else 's'} (selected by --items)"


def _run_collection(args, manifest: str, out: str, overrides: dict, checked) -> int:
    from flows.checks import handing_over
    from flows.collection import RunOptions, colorize_collection, ray_runner
    from flows.stopping import graceful

    options = RunOptions(preset=args.preset, clip=args.clip, items=args.items.split(",") if args.items else None,
                         force=args.force, device=args.device, allow_download=args.allow_download,
                         weight_dtype=args.weight_dtype, overrides=overrides, pool=args.pool,
                         workers_per_device=args.workers_per_device, gpus_per_item=args.gpus_per_item,
                         **_source_limits(args))
    flow_to_run = colorize_collection
    if args.pool == "ray":
        flow_to_run = colorize_collection.with_options(task_runner=ray_runner(args.ray_address))
    with _following_runs(), graceful(), handing_over(checked):
        state = flow_to_run(manifest, out, args.model, options, return_state=True)
    return _finish_flow(state)


def cmd_reprocess(args) -> int:
    from diffcolor.archive import storage
    from diffcolor.common.redact import refuse_credentials
    from diffcolor.common.errors import PromptError
    from diffcolor.common.ids import normalize_item_id

    # 1. The targets, every item id through the item-id rule, and the --set, before any flow starts.
    _, overrides = _configured(args)
    color_map = _parse_color_map(args.color_map) or None
    if not args.targets and (not args.items or not (args.target or color_map)):
        raise PromptError("give --items with --target or --color-map, or a --targets file")
    if args.targets and (args.items or args.target or color_map):
        raise UserError("--targets names each item and its target: give no --items, --target or --color-map with it")
    items = [normalize_item_id(item) for item in args.items.split(",")] if args.items and not args.targets else []
    out, targets_uri = _lift_credentials(args.out, args.targets)
    refuse_credentials(args.model, args.clip, what="--model/--clip")  # flow parameters, stored by Prefect
    out = storage.absolute(out)

    # 2. Every target against its item's caption (the colour words must be words of it that take a colour),
    #    then the model and the output: one line per unsuitable target, exit 2, before any model loads.
    if targets_uri:
        _quiet_prefect()
        from flows.reprocess import read_targets

        targets = [(each.item_id, each.target_prompt, each.color_map) for each in read_targets(targets_uri)]
    else:
        targets = [(item, args.target, color_map) for item in items]
    problems = _unsuitable_targets(out, targets)
    for problem in problems:
        print(f"diffcolor: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    _preflight(args.model, out, args)
    if args.model:
        _smoke_notice(args.model)

    # 3. The reprocess flow, as `run` starts its flow (private Prefect server, stop on SIGINT/SIGTERM).
    _quiet_prefect()
    from flows.local import LocalPrefect
    from flows.reprocess import ReprocessOptions, Retarget, reprocess
    from flows.stopping import graceful, handling_signals

    targets = [Retarget(item_id=item, target_prompt=target, color_map=colors) for item, target, colors in targets]
    options = ReprocessOptions(model=args.model, clip=args.clip, device=args.device, seed=args.seed,
                               preset=args.preset, overrides=overrides,
                               allow_download=args.allow_download, weight_dtype=args.weight_dtype,
                               workers_per_device=args.workers_per_device, pool=args.pool, **_source_limits(args))
    with handling_signals(), LocalPrefect(), _following_runs(), graceful():
        state = reprocess(out, targets, options, return_state=True)
    return _finish_flow(state)


def _unsuitable_targets(out: str, targets: list[tuple[str, str | None, dict | None]]) -> list[str]:
    """One line per target that does not suit its item, as the review application checks a recolour: a colour
    map must name words of the item's caption that take a colour, with one-word colours; a target prompt must
    fit the text encoder. An item never colourised here is left to the flow, which records it as failed."""
    from diffcolor.archive import storage
    from diffcolor.archive.layout import OutputLayout
    from diffcolor.common.text import escape_controls
    from review.app import check_target

    problems = []
    for item_id, target, color_map in targets:  # (item id, target prompt, colour map)
        layout = OutputLayout(out).item(item_id)
        if not storage.exists(layout.result):
            continue
        verdict = check_target(storage.read_json(layout.result), color_map, target)
        if not verdict["ok"]:
            problems.append(f"item '{item_id}': {escape_controls(verdict['problem'])}")
    return problems


def cmd_review(args) -> int:
    """``diffcolor review OUTPUT``: the curators' web application (``review/``) until interrupted."""
    from diffcolor.archive import storage
    from review.guard import normalize_host

    # 1. The --set, the host names answered, and the token: from --token-file, else a random one in a private file.
    overrides = _configured(args)[1] if args.set else {}  # the configuration's modules load torch: only for a --set
    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    for name in [args.host, *args.allowed_host]:
        if normalize_host(name) is None:
            raise UserError(f"{name!r} is not a host name or IP address")
    if args.token_file:
        token = _read_token_file(args.token_file)
    elif not loopback:
        raise UserError(f"--host {args.host} serves beyond this machine: give --token-file with a secret token")
    else:
        token = None
    out = storage.absolute(_lift_credentials(args.out)[0])

    # 2. The application, served by uvicorn; its access log never shows a token.
    _quiet_prefect()
    import logging
    import shutil

    import uvicorn

    from review.app import ReviewConfig, create_app
    from review.guard import RedactQuery

    token_path, private = None, None
    if token is None:
        token, token_path, private = _private_token()
    options = {"pool": args.pool, "device": args.device, "preset": args.preset, "overrides": overrides}
    from review.jobs import keep_warm

    keep_warm(args.keep_warm, args.warm_models)  # a bad value refused now, in one line
    app = create_app(ReviewConfig(output=out, token=token, read_only=args.read_only, host=args.host,
                                reprocess_options=options, port=args.port, allowed_hosts=tuple(args.allowed_host)))
    address = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"review of {out}{' (read-only)' if args.read_only else ''}: {address}/", file=sys.stderr)
    if not loopback and not args.allowed_host:
        print(f"answering only requests for {args.host} and the loopback names: add --allowed-host NAME for each "
              "name clients use to reach this machine", file=sys.stderr)
    if not args.read_only:
        where = args.token_file if token_path is None else f"{token_path} (readable by you only; removed at exit)"
        print(f"sign in to recolour and decide at {address}/login with the token in {where}", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(RedactQuery())
    # SIGINT/SIGTERM: uvicorn stops serving, then the recolour jobs and their Prefect server stop (review/jobs.py)
    # and the private token file is removed.
    from flows.stopping import exit_code, handling_signals, received
    from review.jobs import shutdown

    try:
        with handling_signals():
            uvicorn.Server(config).run()
    except KeyboardInterrupt:  # the signal uvicorn stopped on, raised again once it has stopped: a normal end here
        pass
    finally:
        shutdown()
        if private:
            shutil.rmtree(private, ignore_errors=True)
    print("review server stopped", file=sys.stderr)
    return exit_code() if received() else 0  # the status still says which signal stopped it


def _read_token_file(path: str) -> str:
    """The token in ``path``; ValueError (one line) when it cannot be read or is too short."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise UserError(f"--token-file '{path}' cannot be read: {reason}") from None
    if len(token) < 16 or any(char.isspace() for char in token):
        raise UserError(f"--token-file '{path}' must hold one token of at least 16 characters, no spaces")
    return token


def _private_token() -> tuple[str, str, str]:
    """A random token written to a new file only this user can read: ``(token, file, its folder)``.

    The folder is made by ``mkdtemp`` (mode 0700) in ``$XDG_RUNTIME_DIR`` when
    set, else the temporary folder; the file is created 0600. The token itself
    is never printed: its path is.
    """
    import secrets
    import tempfile

    token = secrets.token_urlsafe(32)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = tempfile.mkdtemp(prefix="diffcolor-review-", dir=runtime if runtime and os.path.isdir(runtime) else None)
    path = os.path.join(folder, "token")
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(token + "\n")
    return token, path, folder


def cmd_eval(args) -> int:
    """``diffcolor eval``: exit 0 when every item with a ground truth was evaluated, 1 when any failed."""
    from diffcolor.tools.eval_report import format_summary
    from diffcolor.tools.evaluate import (
        EvalConfig,
        PerceptualWeights,
        evaluate_manifest,
    )

    config, _ = _configured(args)
    args.manifest, args.out = _lift_credentials(args.manifest, args.out)
    max_side = EvalConfig.max_side if args.max_side is None else (None if args.max_side == 0 else args.max_side)
    models = _load_models(args, args.model)
    weights = PerceptualWeights(lpips=args.lpips_weights, fid=args.fid_weights)

    def show(row: dict) -> None:
        if row["status"] == "done":
            print(f"{row['item_id']} v{row['version']}: PSNR {row['psnr_rgb']:.2f} dB, SSIM {row['ssim_rgb']:.3f}, "
                  f"chroma PSNR {row['psnr_chroma']:.2f} dB{' (reused)' if row.get('reused') else ''}", file=sys.stderr)
        else:
            print(f"{row['item_id']} {row['status']}: {row['error_message']}", file=sys.stderr)

    run = evaluate_manifest(models, args.manifest, args.out, config, preset=args.preset,
                            eval_config=EvalConfig(max_side=max_side), weights=weights,
                            items=set(args.items.split(",")) if args.items else None, on_row=show)
    print(format_summary(run.summary, run.uris))
    return 1 if run.summary["counts"].get("failed") else 0


def cmd_eval_compare(args) -> int:
    """``diffcolor eval-compare A B``: prints the differences and writes a plot and a table under ``--out``."""
    from diffcolor.tools.eval_report import (
        compare_evals,
        format_comparison,
        write_comparison,
    )
    from diffcolor.tools.evaluate import read_eval

    rows_a, summary_a = read_eval(args.a)
    rows_b, summary_b = read_eval(args.b)
    comparison = compare_evals(rows_a, summary_a, rows_b, summary_b)
    print(format_comparison(comparison, args.a, args.b))
    written = write_comparison(comparison, args.a, args.b, args.out)
    print(f"plot:   {written['plot'] or '(none: matplotlib is not installed)'}\nreport: {written['report']}")
    return 0


DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "demo.parquet"
SD_CANDIDATES = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
HOW_TO_GET_WEIGHTS = """\
No Stable Diffusion weights and GPU found, so this demo is a SMOKE RUN on the tiny random bundle:
the pipeline runs end to end, but the pictures are noise-coloured, not colourisations.
To colourise for real:
  1. on a machine with internet access:  hf download stable-diffusion-v1-5/stable-diffusion-v1-5
                                          hf download openai/clip-vit-large-patch14
     (or copy a diffusers-layout folder of any SD 1.x/2.x-base model)
  2. copy the Hugging Face cache (~/.cache/huggingface) to this machine, or set
     DIFFCOLOR_MODEL=/path/to/model-folder
  3. run `make demo` again on a machine with an NVIDIA GPU."""


def find_real_weights() -> str | None:
    """A local SD folder (DIFFCOLOR_MODEL) or a cached hub model, when a GPU is present too."""
    import torch

    if not torch.cuda.is_available():
        return None
    named = os.environ.get("DIFFCOLOR_MODEL")
    if named:
        return named
    from huggingface_hub import snapshot_download

    for repo in SD_CANDIDATES:
        try:
            snapshot_download(repo, local_files_only=True, allow_patterns=["model_index.json"])
            return repo
        except Exception:  # not in the local cache
            continue
    return None


def cmd_demo(args) -> int:
    """``diffcolor demo`` (``make demo``): the collection flow on the bundled demo collection, local defaults."""
    # 1. Real weights and a GPU, or a labelled smoke run on the tiny bundle.
    model = find_real_weights()
    if model is None:
        print(HOW_TO_GET_WEIGHTS)
        model, preset = "tiny", "smoke"
    else:
        preset = "default"
    label = "SMOKE RUN on the tiny random bundle" if model == "tiny" else f"model {model}"
    print(f"\n== DiffColor Archive demo: {label}, preset '{preset}', manifest {DEMO_MANIFEST.name}, output {args.out} ==\n",
          flush=True)

    # 2. The collection flow, exactly as `diffcolor run` starts it.
    code = main(["run", str(DEMO_MANIFEST), "--out", args.out, "--model", model, "--preset", preset])
    if model == "tiny":
        print("\nSMOKE RUN: the outputs test the pipeline only; see the top of this output for how to get weights.")
    return code


# ---------------------------------------------------------------------------
# The parser.


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


def _examples(*lines: str) -> dict:
    """``add_parser`` options that end a command's ``--help`` with examples, kept as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required,
                        help="Stable Diffusion folder, hub id in the local cache, or 'tiny' (random weights: smoke runs)"
                             + ("" if required else "; default: the model each item was made with"))
    parser.add_argument("--clip", help="CLIP folder or hub id (default: the bundle's clip/ or openai/clip-vit-large-patch14)")
    parser.add_argument("--revision", help="pinned hub revision of --model")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--allow-download", action="store_true", help="let models be fetched from the hub (off by default)")
    parser.add_argument("--weight-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="storage of the frozen model weights: auto = bf16 on CUDA (the fast path), fp32 elsewhere; "
                             "fp32 on a GPU for runs whose presets set autocast off")


def _add_preset_option(parser: argparse.ArgumentParser, use: str = "") -> None:
    parser.add_argument("--preset", default="default", choices=PRESET_NAMES,
                        help=f"step counts{use}: smoke (seconds on a CPU with 'tiny'), default, or paper-scale "
                             "(recipe R); default: %(default)s")


def _add_former_spelling(parser: argparse.ArgumentParser, option: str, dest: str) -> None:
    """``option``, another spelling of the option of ``dest``, accepted but not shown: one spelling in the help."""
    parser.add_argument(option, dest=dest, help=argparse.SUPPRESS)


def _add_set_option(parser: argparse.ArgumentParser, what: str = "the preset's") -> None:
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help=f"change one of {what} fields, e.g. stage1.steps=200 or render.alpha=0.9 (a JSON value, "
                             "else text; checked against the configuration before any work starts); repeatable")


def _add_source_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-source-mb", type=_in_range(float, 0.0, float("inf"), "a size in MiB above 0"),
                        metavar="MIB", help=f"largest source image read, MiB (default {SOURCE_LIMIT_MIB}); a larger "
                                            "one fails its item as bad_image")
    parser.add_argument("--source-timeout", type=_in_range(float, 0.0, float("inf"), "seconds above 0"),
                        metavar="S", help=f"longest read of one source, seconds (default {SOURCE_LIMIT_SECONDS}); a "
                                          "FIFO or a device is never read")


def _add_allow_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-host", action="append", metavar="HOST",
                        help="let http(s) URLs from manifests and IIIF reach HOST (a name, an address or a network "
                             "like 10.2.0.0/16) although it is loopback, link-local or private; repeatable; adds to "
                             "DIFFCOLOR_ALLOW_HOSTS")


def _add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers-per-device", type=_workers, default=1, metavar="N",
                        help="local pool: worker processes per GPU (or on the CPU), each loading its own models; "
                             "more than 1 pays where one item's fit leaves the GPU idle (measure with "
                             "python -m diffcolor.tools.bench --concurrent N)")


def _add_single_image_commands(commands) -> None:
    tiny = commands.add_parser("tiny-bundle", help="write the tiny random model bundle (tests and smoke runs only)",
                               **_examples("diffcolor tiny-bundle models/tiny   # then --model models/tiny"))
    tiny.add_argument("dir", help="folder to write the bundle into (created)")
    tiny.set_defaults(handler=cmd_tiny_bundle)

    colorize = commands.add_parser("colorize", help="colourise one image", **_examples(
        "diffcolor colorize scan.tif --caption 'a dog on a bench' --out out/dog --model tiny --preset smoke",
        "diffcolor colorize scan.tif --caption 'a dog on a bench' --color-map '{\"dog\": \"brown\"}' \\\n"
        "    --out out/dog --model /models/stable-diffusion-v1-5"))
    colorize.add_argument("image", help="path or URI of the gray source (never written)")
    colorize.add_argument("--caption", required=True, help="catalogue caption: the context prompt")
    colorize.add_argument("--target", action="append", help="a target prompt; repeat for several (one version each)")
    colorize.add_argument("--color-map", help='JSON object of caption word to colour, e.g. \'{"dog": "brown"}\'')
    _add_former_spelling(colorize, "--colour-map", "color_map")
    colorize.add_argument("--out", required=True, help="item output folder or URI")
    _add_preset_option(colorize)
    _add_set_option(colorize)
    colorize.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same pixels "
                                                              "(default: %(default)s)")
    colorize.add_argument("--item-id", help="item id (default: from the file name)")
    colorize.add_argument("--force", action="store_true", help="colourise a colour photograph too")
    _add_model_options(colorize, required=True)
    _add_allow_host_option(colorize)
    colorize.set_defaults(handler=cmd_colorize)

    recolor = commands.add_parser("recolor", help="render a new target from an item's stored colour state", **_examples(
        "diffcolor recolor out/dog --color-map '{\"dog\": \"black\"}'",
        "diffcolor recolor out/dog --target 'a black dog on a bench' --alpha 1.1"))
    recolor.add_argument("dir", help="the item folder or URI written by colorize")
    recolor.add_argument("--target", help="the new target prompt")
    recolor.add_argument("--color-map", help="JSON colour map instead of --target")
    _add_former_spelling(recolor, "--colour-map", "color_map")
    recolor.add_argument("--alpha", type=float, help="weight of the target embedding (the interpolation weight, "
                         "Imagic's eta), 0 to 1.5; above 1 extrapolates (default: the item's preset)")
    recolor.add_argument("--eta", type=float, help="deprecated name of --alpha")
    recolor.add_argument("--steps", type=int, help="DDIM steps (default: the item's preset)")
    recolor.add_argument("--seed", type=int, help="default: the item's seed")
    _add_set_option(recolor, "the item's stored configuration")
    _add_model_options(recolor, required=False)
    recolor.set_defaults(handler=cmd_recolor)


def _add_doctor_command(commands) -> None:
    doctor = commands.add_parser(
        "doctor", help="check a model folder or cached hub id offline before a run, without loading its weights",
        **_examples("diffcolor doctor tiny", "diffcolor doctor stable-diffusion-v1-5/stable-diffusion-v1-5 --json doctor.json"))
    doctor.add_argument("model", metavar="MODEL", help="Stable Diffusion folder, hub id in the local cache, or 'tiny'")
    doctor.add_argument("--clip", help="CLIP folder or hub id (default: the bundle's clip/ or openai/clip-vit-large-patch14)")
    doctor.add_argument("--revision", help="pinned hub revision of MODEL")
    doctor.add_argument("--caption", action="append", metavar="TEXT", help="also check that this caption, with its "
                        "identifiers, fits the text encoder (repeatable)")
    doctor.add_argument("--device", default="auto", help="where the run will go: 'auto' (CUDA when present), 'cpu', "
                                                         "'cuda', 'cuda:1', ...")
    doctor.add_argument("--weight-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="storage of the frozen weights the run will use (auto = bf16 on CUDA, fp32 elsewhere)")
    doctor.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE (path or URI; "
                                                       "'-': stdout, the text report then going to stderr)")
    doctor.set_defaults(handler=cmd_doctor)


def _add_manifest_check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check-sources", action="store_true",
                        help="also ask remote stores that every image exists (s3://: the store; http(s)://: a HEAD "
                             "request, SSRF-checked); local files are always checked")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a column whose name is close to a known one (captoin, colormap) instead of "
                             "warning and keeping it as a catalogue field")


def _add_manifest_commands(commands) -> None:
    manifest = commands.add_parser("manifest", help="build or validate a Parquet manifest")
    actions = manifest.add_subparsers(dest="manifest_command", required=True)

    build = actions.add_parser("build", help="build a manifest from a folder, a CSV export or a IIIF manifest",
                               **_examples("diffcolor manifest build --from-csv catalogue.csv -o manifest.parquet",
                                           "diffcolor manifest build --from-folder scans/ --captions captions.csv "
                                           "-o manifest.parquet",
                                           "diffcolor manifest build --from-iiif manifest.json --language fr "
                                           "-o manifest.parquet"))
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="a folder of images (needs --captions)")
    source.add_argument("--from-csv", metavar="CSV", help="a catalogue CSV export with item_id, image_uri, caption")
    source.add_argument("--from-iiif", metavar="FILE_OR_URL", help="a IIIF Presentation 3 manifest")
    build.add_argument("--captions", metavar="CSV_OR_JSON", help="captions for --from-folder: CSV or JSON")
    build.add_argument("--language", metavar="LANG", help="--from-iiif: the language to take from IIIF language maps "
                                                          "(default: 'none', else 'en', else the first given)")
    build.add_argument("--image-info", action="append", metavar="INFO_JSON",
                       help="--from-iiif: a cached Image API info.json (its size limits are honoured); repeatable")
    build.add_argument("-o", "--out", required=True, metavar="OUT.parquet", help="the manifest to write (path or URI)")
    _add_manifest_check_options(build)
    _add_allow_host_option(build)
    build.set_defaults(handler=cmd_manifest_build)

    validate = actions.add_parser("validate", help="check a manifest; one line per problem, naming row and column",
                                  **_examples("diffcolor manifest validate manifests/demo.parquet"))
    validate.add_argument("file", help="the manifest (path or URI)")
    _add_manifest_check_options(validate)
    _add_allow_host_option(validate)
    validate.add_argument("--model", help="also check every model prompt fits this model's text encoder (a folder, "
                          "a hub id in the local cache, or 'tiny')")
    validate.add_argument("--revision", help="the model's hub revision")
    validate.add_argument("--allow-download", action="store_true", help="fetch the model's tokenizer if missing")
    validate.set_defaults(handler=cmd_manifest_validate)


def _add_iiif_command(commands) -> None:
    iiif = commands.add_parser(
        "iiif", help="publish the collection's approved colour versions as a IIIF Presentation 3 manifest "
                     "(--unreviewed: and the latest done version of the others, marked not reviewed)",
        **_examples("diffcolor iiif demo-output --base-url https://images.example.org/demo   "
                    "# -> demo-output/iiif/manifest.json"))
    iiif.add_argument("output", help="the collection's output root (path or URI), as given to run --out")
    iiif.add_argument("--base-url", required=True, metavar="URL",
                      help="the http(s) URL the output root is served at; image URLs are it + each file's path")
    iiif.add_argument("-o", "--out", metavar="FILE", help="where to write the manifest (default OUTPUT/iiif/manifest.json)")
    iiif.add_argument("--label", help="the manifest's label (default: the output folder's name)")
    iiif.add_argument("--unreviewed", action="store_true",
                      help="also publish items no curator approved, with their latest done version, labelled "
                           "'not reviewed by a curator' (a version a curator rejected is never published)")
    iiif.set_defaults(handler=cmd_iiif)


def _add_collection_commands(commands) -> None:
    run = commands.add_parser("run", help="run the collection flow over a manifest (local Prefect, local device pool)",
                              **_examples(
        "diffcolor run manifests/demo.parquet --out demo-output --model tiny --preset smoke",
        "diffcolor run s3://museum/manifests/2026.parquet --out s3://museum/colour --model /models/sd15 \\\n"
        "    --items 1921.4.7,1921.4.8 --set stage1.steps=200"))
    run.add_argument("manifest", help="Parquet manifest path or URI")
    run.add_argument("--out", required=True, help="collection output root (path or URI)")
    _add_preset_option(run)
    run.add_argument("--items", help="comma-separated item ids to run (default: all)")
    run.add_argument("--force", action="store_true", help="redo done items; colourise colour photographs too")
    run.add_argument("--pool", choices=("local", "inline", "ray"), default="local",
                     help="local: worker processes on this machine's GPUs; inline: items in the flow's own process "
                          "(for debugging); ray: one GPU per item task on a Ray cluster")
    run.add_argument("--ray-address", help="Ray cluster address, e.g. ray://head:10001 (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--gpus-per-item", type=_gpu_share, default=1.0, metavar="F",
                     help="Ray only: the GPU share each item task reserves, e.g. 0.5 for two items per GPU (default 1)")
    _add_set_option(run)
    _add_model_options(run, required=True)
    _add_workers_option(run)
    _add_source_limit_options(run)
    _add_allow_host_option(run)
    run.set_defaults(handler=cmd_run)

    again = commands.add_parser("reprocess", help="render new targets for selected items from their colour states",
                                **_examples(
        "diffcolor reprocess demo-output --items camera --color-map '{\"coat\": \"gray\"}'",
        "diffcolor reprocess s3://museum/colour --targets corrections.parquet"))
    again.add_argument("out", metavar="OUTPUT", help="collection output root")
    again.add_argument("--items", help="comma-separated item ids")
    again.add_argument("--target", help="new target prompt for every selected item")
    again.add_argument("--color-map", help="JSON colour map for every selected item: each item's caption must have "
                                           "its words (checked before any model loads)")
    again.add_argument("--targets", help="Parquet file of item_id, target_prompt and/or color_map: a target per item, "
                                         "the way to recolour several items whose captions differ")
    _add_former_spelling(again, "--colour-map", "color_map")
    again.add_argument("--seed", type=int, help="random seed of the renders (default: each item's own)")
    _add_preset_option(again, " of the full fit of an item without a colour state")
    _add_set_option(again, "the configuration's (the preset's for a full fit, the item's stored one for a render)")
    again.add_argument("--pool", choices=("local", "inline"), default="local",
                       help="local: worker processes on this machine's GPUs; inline: in the flow's own process")
    _add_model_options(again, required=False)
    _add_workers_option(again)
    _add_source_limit_options(again)
    _add_allow_host_option(again)
    again.set_defaults(handler=cmd_reprocess)

    demo = commands.add_parser("demo", help="run the collection flow on the bundled demo collection (make demo)",
                               **_examples("diffcolor demo --out demo-output"))
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    demo.set_defaults(handler=cmd_demo)


def cmd_bag(args) -> int:
    """``diffcolor bag OUTPUT --run RUN_ID -o DIR``: the run's derivatives and records as a validated BagIt bag."""
    from diffcolor.archive.bag import write_bag

    summary = write_bag(_lift_credentials(args.out)[0], args.run, args.bag, organization=args.organization)
    print(f"bag {summary['bag']}: run {summary['run_id']}, {summary['versions']} versions, {summary['files']} files; "
          "valid (sha256 and sha512 manifests)")
    return 0


def cmd_verify(args) -> int:
    """``diffcolor verify OUTPUT``: the fixity audit; 0 when every record holds, 1 otherwise."""
    from diffcolor.archive import storage
    from diffcolor.archive.fixity import audit_output

    audit = audit_output(_lift_credentials(args.out)[0], repair=args.repair,
                         on_problem=lambda problem: print(problem.line()),
                         on_note=lambda problem: print(f"note: {problem.line()}"))
    print(audit.summary())
    if audit.queued:
        print(f"queued for the next run: {', '.join(audit.queued[:20])}{' ...' if len(audit.queued) > 20 else ''}")
    if args.json:
        storage.write_json(storage.absolute(args.json), audit.to_dict())
    for where in (audit.report, args.json):
        if where:
            print(f"report: {storage.absolute(where)}")
    return 0 if audit.ok else 1


def _add_verify_command(commands) -> None:
    verify = commands.add_parser(
        "verify", help="fixity audit: every file the items' records name is present with its recorded sha256",
        **_examples("diffcolor verify demo-output", "diffcolor verify s3://museum/colour --json audit.json",
                    "diffcolor verify /data/colour --repair   # queue damaged items for the next run"))
    verify.add_argument("out", metavar="OUTPUT", help="collection output root (path or URI)")
    verify.add_argument("--repair", action="store_true",
                        help="drop damaged items from the done-index so the next run redoes them, and write the "
                             "report to OUTPUT/verify/TIME.json (without it nothing is written under OUTPUT)")
    verify.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE (path or URI)")
    verify.set_defaults(handler=cmd_verify)


def _add_delivery_commands(commands) -> None:
    bag = commands.add_parser("bag", help="deliver a run's derivatives and records as a validated BagIt bag",
                              **_examples("diffcolor bag demo-output --run 20261203T145451Z-e4abc7 -o bags/run1"))
    bag.add_argument("out", metavar="OUTPUT", help="collection output root (path or URI)")
    bag.add_argument("--run", required=True, metavar="RUN_ID", help="the run to deliver (a folder of OUTPUT/runs/)")
    bag.add_argument("-o", "--bag", required=True, metavar="DIR", help="new local folder for the bag")
    bag.add_argument("--organization", help="Source-Organization for bag-info.txt")
    bag.set_defaults(handler=cmd_bag)


def _add_eval_commands(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="colourise a ground-truth set and measure it (PSNR, SSIM, colourfulness, CLIP, LPIPS, FID)",
        **_examples("diffcolor eval manifests/eval_demo.parquet --out eval-output --model tiny --preset smoke"))
    evaluate.add_argument("manifest", help="a manifest whose rows have ground_truth_uri (colour originals)")
    evaluate.add_argument("--out", required=True, help="output root; the eval goes under OUT/eval/")
    _add_preset_option(evaluate)
    _add_set_option(evaluate)
    evaluate.add_argument("--items", help="only these item ids, comma-separated")
    evaluate.add_argument("--lpips-weights", metavar="PATH",
                          help="torchvision's alexnet-owt-7be5be79.pth (file or folder); without it LPIPS is not computed")
    evaluate.add_argument("--fid-weights", metavar="PATH",
                          help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's "
                               "pt_inception-2015-12-05-6726825d.pth; file or folder); without it FID is not computed")
    evaluate.add_argument("--max-side", type=int, metavar="PX",
                          help=f"long side (px) at which PSNR/SSIM/LPIPS/FID compare (default {EVAL_MAX_SIDE}; 0: full size)")
    _add_model_options(evaluate, required=True)
    _add_allow_host_option(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser("eval-compare", help="compare two evals (e.g. two presets) item by item")
    compare.add_argument("a", help="eval A: an output root, its eval/ folder or its eval.parquet")
    compare.add_argument("b", help="eval B, the same way")
    compare.add_argument("--out", default="eval-compare", help="folder for compare.html, compare.png, compare.parquet")
    compare.set_defaults(handler=cmd_eval_compare)


def _add_review_command(commands) -> None:
    review = commands.add_parser(
        "review", help="the curators' web application: browse, compare, recolour and approve versions",
        **_examples("diffcolor review demo-output", "diffcolor review s3://museum/colour --read-only",
                    "diffcolor review /data/colour --host 0.0.0.0 --token-file /etc/diffcolor/review-token"))
    review.add_argument("out", metavar="OUTPUT", help="collection output root (path or URI)")
    review.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s; any other "
                                                            "needs --token-file)")
    review.add_argument("--port", type=int, default=8765, help="default %(default)s")
    review.add_argument("--token-file", metavar="F", help="file holding the server's secret token (default: a random "
                                                          "token in a new private file, whose path is printed)")
    review.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name clients use to reach the server (repeatable); requests for any other name "
                             "than these, --host and the loopback names are refused")
    review.add_argument("--read-only", action="store_true", help="browse only: no recolouring, no decisions")
    review.add_argument("--pool", choices=("local", "inline"), default="local",
                        help="where recolouring runs without PREFECT_API_URL: local worker processes or inline")
    review.add_argument("--device", default="auto", help="device of local recolouring (default %(default)s)")
    review.add_argument("--keep-warm", type=float, default=600.0, metavar="SECONDS",
                        help="local recolouring keeps each model's workers loaded until unused for this long "
                             "(default %(default)g; 0: load the models for every job)")
    review.add_argument("--warm-models", type=int, default=2, metavar="N",
                        help="models (with their device settings) kept loaded at most, the least recently used "
                             "freed first (default %(default)s)")
    _add_preset_option(review)
    _add_set_option(review, "the preset's (for the full fit of a recoloured item without a colour state)")
    _add_allow_host_option(review)
    review.set_defaults(handler=cmd_review)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcolor", description="Text-guided colourisation of archival photographs (DiffColor).",
        **_examples("make demo                        # the demo collection, set-up included",
                    "diffcolor doctor MODEL           # check weights before a night's run",
                    "diffcolor run MANIFEST --out OUT --model MODEL",
                    "diffcolor reprocess OUT --items ID --color-map '{\"coat\": \"green\"}'",
                    "diffcolor COMMAND --help         # each command's options and examples"))
    parser.add_argument("--version", action="version", version=f"diffcolor-archive {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_single_image_commands(commands)
    _add_doctor_command(commands)
    _add_manifest_commands(commands)
    _add_iiif_command(commands)
    _add_collection_commands(commands)
    _add_eval_commands(commands)
    _add_delivery_commands(commands)
    _add_verify_command(commands)
    _add_review_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_host", None):  # before anything reads a URL; the pool's workers inherit it
        from diffcolor.archive.outside import allow_hosts

        allow_hosts(args.allow_host)
    try:
        return args.handler(args)
    except KeyboardInterrupt as interrupt:  # SIGINT, or SIGTERM where a command handles it (flows/stopping.py)
        print(f"diffcolor: interrupted{' by ' + str(interrupt) if str(interrupt) else ''}; a rerun resumes from "
              "the latest checkpoint", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    except Exception as error:
        from diffcolor.common.errors import DiffColorError

        # A file the system refused (missing, not a folder, no permission) is the user's to fix, named; anything
        # else not raised on purpose (a plain ValueError too) is a bug.
        if not isinstance(error, DiffColorError) and not (isinstance(error, OSError) and error.filename is not None):
            return _report_bug(error)
        from diffcolor.common.text import escape_controls

        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"diffcolor: error: {escape_controls(message)}", file=sys.stderr)
        return 2
    finally:
        # Arrow objects still held by reference cycles (an exception's traceback and its frames hold a table) are
        # freed now, while Arrow is whole: freed at interpreter teardown, beside torch, Arrow's reader threads
        # can abort the process ("terminate called without an active exception", exit 134; apache/arrow#34314).
        import gc

        gc.collect()


def _report_bug(error: BaseException) -> int:
    """An exception DiffColor did not raise on purpose: its traceback and where to report it; exit status 1."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print(f"diffcolor: internal error ({type(error).__name__}), a bug in diffcolor-archive {__version__}: "
          f"{_where_to_report()}", file=sys.stderr)
    return 1


def _where_to_report() -> str:
    """The issue tracker of the installed package's metadata (``[project.urls]``), else the maintainers."""
    from importlib import metadata

    try:
        urls = metadata.metadata("diffcolor-archive").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for label, _, url in (entry.partition(",") for entry in urls):
        if label.strip().lower().replace(" ", "").replace("-", "") in ("issues", "bugtracker", "tracker", "bugs"):
            return f"please report it at {url.strip()} with this traceback"
    return "please report it to the maintainers with this traceback"


if __name__ == "__main__":
    sys.exit(main())
