"""``diffcolor doctor``: a model checked offline, in seconds, before a night's run.

An operator names a weights folder, a cached hub id or ``tiny``; the doctor
says whether :func:`~diffcolor.method.models.load_models` will load it and
what the method will run with, without loading a single weight into a model:

- **resolution**: the name to a folder exactly as ``load_models`` resolves it
  (no network);
- **layout**: ``model_index.json``, the five component folders and their
  configs, each parsed;
- **weights**: safetensors only (a pickled file is refused with load_models'
  own reason), read from the file headers: dtypes, variant files, sizes,
  truncation, the sha256 of every file loaded and the model hash;
- **shapes**: each component's module built on the meta device from its config
  and its tensor names and shapes compared with the header's, with the key
  renames ``from_pretrained`` applies;
- **consistency** between the components and the **working size** the
  method will run at (the UNet's ``sample_size`` x the VAE factor, unless a
  preset sets ``model_pixels``: 768 for SD 2.x 768-v), the **prompts**
  (the tokenizer's length, the identifier a single token, the anti-colour
  prompts and any ``--caption``, rewritten with its identifiers, fitting the
  text encoder whole), the **scheduler** the method builds
  (:func:`~diffcolor.method.diffusion.scheduler_settings`, every correction a
  note), the **CLIP** model it will use, the **random-weight** marker, and the
  **device** with the memory the frozen weights will take there.

:func:`check_model` returns a :class:`DoctorReport` (checks with problems,
notes and facts); :func:`preflight_model` is the same check for the flows,
raising :class:`ModelCheckError` naming every problem before any item is
touched. A problem is something that stops a load or makes the method compute
the wrong thing; a note is what the method corrects or the operator should know.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffcolor.common.errors import ModelNotFoundError, PermanentError
from diffcolor.common.tensorfiles import (
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    read_header,
)
from diffcolor.method.libraries import MODEL_BUILD_LOCK, model_libraries
from diffcolor.method.model_names import TINY, resolve_model
from diffcolor.method.models import (
    DEFAULT_CLIP,
    PICKLED_SUFFIXES,
    SD_COMPONENTS,
    TINY_MARKER,
    native_side,
    resolve_bundle,
    resolve_folder,
    resolve_model_hash,
    sha256_file,
)

# The weight folders load_models reads, the library that reads each, and the file stem from_pretrained looks for
# (SHARDED: the same stem's ``.safetensors.index.json`` naming the shards).
WEIGHT_FOLDERS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "clip": "transformers"}
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
MAX_TENSOR_LINES = 5  # problem lines per component and kind (missing, unexpected, wrong shape); the rest are counted
# safetensors dtype names: torch's name and bytes per element.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8), "I32": ("int32", 4),
    "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# load_models' reason for refusing a pickled weight file (diffcolor.method.models), word for word.
PICKLED_REASON = ("is a pickled weight file, which DiffColor never loads (it can run code); convert the model to "
                  "safetensors (diffusers: save_pretrained(..., safe_serialization=True))")


class ModelCheckError(PermanentError):
    """A model failed the doctor's checks; ``problems`` lists every problem, the message names them all on one line."""

    error_class = "bad_model"

    def __init__(self, model: str, problems: list[str]):
        self.model = model
        self.problems = list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"model '{model}' fails its pre-flight check ({count}): {'; '.join(self.problems)} "
                         f"(diffcolor doctor {model} shows the full report)")

    def __reduce__(self):
        # Crosses process boundaries (workers, Ray) with its problems, like ManifestError.
        return (type(self), (self.model, self.problems))


@dataclass
class Check:
    """One check of the report: a one-line summary, its problems and notes, detail lines and facts (JSON-ready)."""

    name: str
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # informational lines (files, sizes, hashes)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(_one_line(text))


@dataclass
class DoctorReport:
    """What :func:`check_model` found: every check, in the order they ran."""

    model: str  # as the operator named it
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        """Every problem, one line each, prefixed by its check's name."""
        return [f"{check.name}: {problem}" for check in self.checks for problem in check.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def random_weights(self) -> bool:
        """Whether the model declares random weights (its outputs are labelled smoke runs)."""
        return bool(self.facts("random").get("random_weights"))

    @property
    def model_hash(self) -> str | None:
        """The model hash load_models will report (None when it was not computed or the model is refused)."""
        return self.facts("weights").get("model_hash")

    def check(self, name: str) -> Check | None:
        """The check called ``name`` (None when it did not run: the model was not found)."""
        return next((check for check in self.checks if check.name == name), None)

    def facts(self, name: str) -> dict:
        """The facts of the check called ``name`` (empty when it did not run)."""
        found = self.check(name)
        return found.facts if found else {}

    def to_dict(self) -> dict:
        return {"model": self.model, "ok": self.ok, "problems": self.problems, "model_hash": self.model_hash,
                "seconds": round(self.seconds, 3), "checks": [dict(asdict(check), ok=check.ok) for check in self.checks]}

    def lines(self) -> list[str]:
        """The report as text: per check its summary (ok or FAIL), one line per problem (PROBLEM) and note, details,
        then the verdict."""
        lines = [f"diffcolor doctor: {self.model}"]
        for check in self.checks:
            lines.append(f"{'ok' if check.ok else 'FAIL':<8} {check.name}: {check.summary}".rstrip())
            lines += [f"{'PROBLEM':<8} {check.name}: {problem}" for problem in check.problems]
            lines += [f"{'note':<8} {check.name}: {note}" for note in check.notes]
            lines += [f"{'':<8}   {detail}" for detail in check.details]
        count = len(self.problems)
        verdict = "OK: no problems" if self.ok else f"FAILED: {count} problem{'s' if count != 1 else ''}"
        lines.append(f"{verdict} ({self.seconds:.1f} s)")
        return lines


@dataclass
class _Component:
    """What the checks learn about one weight folder (unet, vae, text_encoder, clip) and pass on."""

    label: str
    folder: Path
    library: str  # "diffusers" or "transformers"
    config: dict | None = None
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape), loaded files
    sharded: bool = False
    module: object = None  # built on the meta device by the shapes check
    load_dtype: str = "float32"  # what load_models loads it in: fp32, whatever the config names


# ---------------------------------------------------------------------------
# The public entry points.


def check_model(model: str, *, clip: str | None = None, revision: str | None = None, clip_revision: str | None = None,
                device: str = "auto", weight_dtype: str = "auto", allow_download: bool = False, hashes: bool = True,
                probe_memory: bool = True, captions: tuple[str, ...] | list[str] = ()) -> DoctorReport:
    """Checks the model ``model`` (a folder, a hub id in the local cache, or ``tiny``) without loading its weights.

    ``clip``, ``revision``, ``clip_revision`` and ``allow_download`` are
    load_models' own (the doctor itself never downloads unless
    ``allow_download``); ``device`` ("auto": CUDA when present) and
    ``weight_dtype`` say where and how the frozen weights will be stored.
    ``hashes=False`` skips the sha256 of the weight files (and the model hash);
    ``probe_memory=False`` leaves the device's free memory unread (reading it
    creates a CUDA context). ``captions`` are checked as the pipeline checks an
    item's (rewritten with the identifier, against the text encoder's length).
    Returns the report; raises nothing for a bad model
    or device (every finding is a problem line), ValueError for a bad ``weight_dtype``.
    """
    started = time.perf_counter()
    report = DoctorReport(model=model)

    # 1. Names to folders, exactly as load_models resolves them.
    resolution, folder, clip_name, clip_folder, refusal = _check_resolution(model, clip, revision, clip_revision,
                                                                            allow_download)
    report.checks.append(resolution)
    if folder is not None:
        components = {label: _Component(label, clip_folder if label == "clip" else folder / label, library)
                      for label, library in WEIGHT_FOLDERS.items() if label != "clip" or clip_folder is not None}
        # 2. Layout and configs; 3. weight files; 4. shapes against the configs.
        layout, configs = _check_layout(folder, components)
        clip_check = _check_clip(clip_name, clip_folder, components.get("clip"))
        weights = _check_weights(components, hashes)
        if hashes and refusal is None:
            weights.facts["model_hash"] = resolve_model_hash(resolution.facts["resolved"], clip=clip, revision=revision,
                                                             clip_revision=clip_revision, allow_download=allow_download)
            weights.summary += f"; model hash {weights.facts['model_hash']}"
        shapes = _check_shapes(components)
        # 5. Consistency between the components; 6. the scheduler the method builds.
        consistency = _check_consistency(configs, components)
        scheduler = _check_scheduler(configs.get("scheduler"))
        # 7. Random weights; 8. the device and the memory the frozen weights take there.
        marker = _check_random_weights(folder)
        device_check = _check_device(device, weight_dtype, components, probe_memory)
        prompts = _check_prompts(folder, configs, captions)
        report.checks += [layout, weights, shapes, consistency, prompts, scheduler, clip_check, marker, device_check]

    # 9. Whatever load_models refuses is a problem, even where no check above names it.
    if refusal is not None:
        if report.ok:
            resolution.problem(refusal)
        else:
            resolution.notes.append(f"load_models refuses it: {refusal}")
    report.seconds = time.perf_counter() - started
    return report


def preflight_model(model: str, **options) -> DoctorReport:
    """:func:`check_model` for the flows: the report when the model passes, else ModelCheckError naming every problem.

    ``options`` are check_model's. The flows call it before planning, so a
    broken model fails the run before any item is touched; the report's
    ``model_hash`` is the one planning needs (computed once).
    """
    report = check_model(model, **options)
    if not report.ok:
        raise ModelCheckError(model, report.problems)
    return report


def format_report(report: DoctorReport) -> str:
    """The report as the command line prints it."""
    return "\n".join(report.lines())


# ---------------------------------------------------------------------------
# 1. Resolution.


def _check_resolution(model: str, clip: str | None, revision: str | None, clip_revision: str | None,
                      allow_download: bool) -> tuple[Check, Path | None, str | None, Path | None, str | None]:
    """The check, the bundle's folder, CLIP's name and folder, and load_models' refusal (None: it accepts the names).

    Each folder is found even where load_models would refuse the bundle, so
    that the other checks can say everything that is wrong with it.
    """
    check = Check("resolution")
    name = resolve_model(model)
    refusal = None
    try:
        resolve_bundle(name, clip, revision, clip_revision, allow_download)
    except ModelNotFoundError as error:
        refusal = _one_line(str(error))

    # The bundle's folder: as load_models finds it, else the folder or cached snapshot to examine anyway.
    try:
        folder = resolve_folder(name, revision=revision, allow_download=allow_download,
                                what="Stable Diffusion model", check="unet/config.json")
    except ModelNotFoundError as error:
        folder = _any_folder(name, revision)
        if folder is None:
            check.problem(str(error))
            check.summary = f"'{model}' not found"
            return check, None, None, None, refusal

    # CLIP: the bundle's clip/ unless --clip names another, else the default, as load_models picks it.
    clip_name, clip_folder = None, None
    if clip is None and (folder / "clip" / "config.json").exists():
        clip_folder = folder / "clip"
    else:
        clip_name = clip or DEFAULT_CLIP
        try:
            clip_folder = resolve_folder(clip_name, revision=clip_revision, allow_download=allow_download,
                                         what="CLIP model", check="config.json")
        except ModelNotFoundError as error:
            check.problem(str(error))

    kind = "the cached tiny bundle" if model == TINY else "a local folder" if Path(name).expanduser().is_dir() else \
        "a hub id in the local cache"
    check.summary = f"'{model}' is {kind}: {folder}"
    check.facts = {"name": model, "resolved": name, "kind": kind, "folder": str(folder), "revision": revision,
                   "clip": clip_name or f"{model}/clip", "clip_folder": None if clip_folder is None else str(clip_folder)}
    return check, folder, clip_name, clip_folder, refusal


def _any_folder(name: str, revision: str | None) -> Path | None:
    """The folder a name stands for even without ``unet/config.json``: the path itself, or the cached hub snapshot."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        return resolve_folder(name, revision=revision, allow_download=False, what="Stable Diffusion model",
                              check="model_index.json")
    except ModelNotFoundError:
        return None


# ---------------------------------------------------------------------------
# 2. Layout and configs.


def _check_layout(folder: Path, components: dict[str, _Component]) -> tuple[Check, dict]:
    """model_index.json, the component folders and each config file, parsed; the configs by component."""
    check = Check("layout")
    configs: dict[str, dict] = {}
    index = _read_json(folder / "model_index.json", check, "model_index.json")
    if index is not None:
        configs["model_index"] = index
    for component in SD_COMPONENTS:
        if not (folder / component).is_dir():
            check.problem(f"{component}/ is missing: a Stable Diffusion bundle has {', '.join(SD_COMPONENTS)}")
            continue
        config = _read_json(folder / component / CONFIG_FILES[component], check, f"{component}/{CONFIG_FILES[component]}")
        if config is not None:
            configs[component] = config
            if component in components:
                components[component].config = config
    tokenizer = folder / "tokenizer"
    if tokenizer.is_dir() and not _has_tokenizer_vocabulary(tokenizer):
        check.problem("tokenizer/ has neither tokenizer.json nor vocab.json with merges.txt")
    check.summary = (f"model_index.json and {', '.join(SD_COMPONENTS)}: {len(configs)} configs parse"
                     if check.ok else f"{len(configs)} configs parse")
    check.facts = {"components": [c for c in SD_COMPONENTS if (folder / c).is_dir()],
                   "pipeline": (index or {}).get("_class_name"),
                   "classes": {name: configs[name].get("_class_name") for name in ("unet", "vae", "scheduler")
                               if name in configs}}
    return check, configs


def _read_json(path: Path, check: Check, label: str) -> dict | None:
    """A JSON object file's content, or None with a problem naming the file."""
    if not path.is_file():
        check.problem(f"{label} is missing")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        check.problem(f"{label} does not parse: {error}")
        return None
    if not isinstance(value, dict):
        check.problem(f"{label} is not a JSON object")
        return None
    return value


def _has_tokenizer_vocabulary(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


# ---------------------------------------------------------------------------
# 3. Weight files.


def _check_weights(components: dict[str, _Component], hashes: bool) -> Check:
    """Safetensors only, the files from_pretrained loads read from their headers, with sizes and sha256."""
    check = Check("weights")
    files, dtypes, total = [], set(), 0
    for component in components.values():
        if not component.folder.is_dir():
            continue  # the layout check (or the CLIP check) says so
        loaded = _loaded_weight_files(component, check)
        for path in sorted(p for p in component.folder.iterdir() if p.is_file()):
            if not path.name.endswith(".safetensors"):
                if path.name.endswith(PICKLED_SUFFIXES) and loaded:
                    check.notes.append(f"{component.label}/{path.name} is pickled and never loaded (the safetensors "
                                       "file is)")
                continue
            entry = {"file": f"{component.label}/{path.name}", "bytes": path.stat().st_size,
                     "loaded": path in loaded, "variant": _variant(path.name, component.library)}
            if path in loaded:
                header_dtypes = _read_tensors(path, component, check)
                entry["dtypes"] = sorted(header_dtypes)
                dtypes |= header_dtypes
                if hashes:
                    entry["sha256"] = sha256_file(path)
                total += entry["bytes"]
            elif entry["variant"]:
                check.notes.append(f"{entry['file']}: {entry['variant']} variant, not loaded (load_models reads the "
                                   "default weights)")
            files.append(entry)
            check.details.append(f"{entry['file']}  {entry['bytes']:,} bytes"
                                 + (f"  {'/'.join(entry['dtypes'])}" if "dtypes" in entry else "  not loaded")
                                 + (f"  sha256 {entry['sha256']}" if "sha256" in entry else ""))
    check.facts = {"files": files, "dtypes": sorted(dtypes), "loaded_bytes": total,
                   "weight_sha256": {entry["file"]: entry["sha256"] for entry in files if "sha256" in entry}}
    loaded_count = sum(entry["loaded"] for entry in files)
    check.summary = (f"{loaded_count} files loaded{', safetensors only' if check.ok else ''} "
                     f"({', '.join(sorted(dtypes)) or 'no tensors'}), {total:,} bytes")
    return check


def _loaded_weight_files(component: _Component, check: Check) -> list[Path]:
    """The safetensors files from_pretrained reads for ``component`` (the default name or its shards); problems else."""
    stem = WEIGHT_STEMS[component.library]
    single = component.folder / f"{stem}.safetensors"
    index = component.folder / f"{stem}.safetensors.index.json"
    label = component.label
    if single.is_file():
        return [single]
    if index.is_file():
        content = _read_json(index, check, f"{label}/{index.name}")
        weight_map = (content or {}).get("weight_map")
        if content is not None and not isinstance(weight_map, dict):
            check.problem(f"{label}/{index.name} has no weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        for shard in shards:
            if not (component.folder / shard).is_file():
                check.problem(f"{label}/{shard} is missing (named by {index.name})")
        component.sharded = True
        return [component.folder / shard for shard in shards if (component.folder / shard).is_file()]
    names = sorted(p.name for p in component.folder.iterdir() if p.is_file())
    pickled = [name for name in names if name.endswith(PICKLED_SUFFIXES)]
    variants = [name for name in names if name.endswith(".safetensors")]
    if pickled and not variants:
        check.problem(f"{label}/{pickled[0]} {PICKLED_REASON}")
    elif variants:
        check.problem(f"{label}/ has no {single.name}, only {', '.join(variants)}: load_models reads the default "
                      f"weights, not a variant; save them without a variant")
    else:
        check.problem(f"{label}/ has no weights ({single.name})")
    return []


def _variant(name: str, library: str) -> str | None:
    """The variant of a safetensors file name (``fp16`` of ``diffusion_pytorch_model.fp16.safetensors``), else None."""
    match = re.fullmatch(rf"{WEIGHT_STEMS[library]}\.([A-Za-z0-9_]+)(-\d+-of-\d+)?\.safetensors", name)
    return match.group(1) if match else None


def _read_tensors(path: Path, component: _Component, check: Check) -> set[str]:
    """Reads the header of ``path`` into ``component.tensors``; its dtypes. Problems for a header that does not fit."""
    label = f"{component.label}/{path.name}"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        length = int.from_bytes(prefix, "little") if len(prefix) == HEADER_LENGTH_BYTES else 0
        body = handle.read(length) if 0 < length <= MAX_HEADER_BYTES else b""
    try:
        header = read_header(prefix + body)
    except ValueError as error:
        check.problem(f"{label}: {error}")
        return set()
    dtypes, end, wrong = set(), 0, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(side) for side in entry["shape"])
            begin, stop = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            check.problem(f"{label}: the header entry of {name} is not a tensor (dtype, shape, data_offsets)")
            continue
        torch_name, itemsize = SAFETENSORS_DTYPES.get(dtype, (str(dtype), 0))
        dtypes.add(torch_name)
        if itemsize and stop - begin != _numel(shape) * itemsize:
            wrong.append(name)
        end = max(end, stop)
        component.tensors[name] = (torch_name, shape)
    if HEADER_LENGTH_BYTES + length + end > size:
        check.problem(f"{label} is truncated: {size:,} bytes, its header describes {HEADER_LENGTH_BYTES + length + end:,}")
    if wrong:
        check.problem(f"{label}: {len(wrong)} tensor(s) whose byte range does not match dtype and shape, first {wrong[0]}")
    return dtypes


# ---------------------------------------------------------------------------
# 4. Shapes.


def _check_shapes(components: dict[str, _Component]) -> Check:
    """Each component's module on the meta device, from its config; its state_dict against the header's tensors."""
    check = Check("shapes")
    counts = {}
    for component in components.values():
        if component.config is None or not component.tensors:
            continue  # the layout or weights check says why
        try:
            component.module = _meta_module(component)
        except Exception as error:  # a config the library rejects: the load would fail the same way
            check.problem(f"{component.label}: its module cannot be built from its config: {type(error).__name__}: {error}")
            continue
        expected = {name: tuple(tensor.shape) for name, tensor in component.module.state_dict().items()}
        found, converted = _renamed_tensors(component, expected)
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        ignored = [name for name in unexpected if _ignored_unexpected(component.module, name)]
        unexpected = [name for name in unexpected if name not in ignored]
        wrong = sorted(name for name in set(expected) & set(found)
                       if name not in converted and found[name] != expected[name])
        _capped(check, component.label, "missing tensor", [f"{n} {list(expected[n])}" for n in missing])
        _capped(check, component.label, "unexpected tensor", [f"{n} {list(found[n])}" for n in unexpected])
        _capped(check, component.label, "wrong shape",
                [f"{n} is {list(found[n])}, its config makes {list(expected[n])}" for n in wrong])
        if ignored:
            check.notes.append(f"{component.label}: {len(ignored)} tensor(s) from_pretrained ignores ({ignored[0]} ...)")
        counts[component.label] = len(expected)
    check.facts = {"tensors": counts}
    check.summary = ", ".join(f"{label} {count}" for label, count in counts.items()) + " tensors checked against the configs"
    return check


def _meta_module(component: _Component):
    """The module load_models builds for ``component``, with no memory behind its tensors (accelerate's meta device)."""
    from accelerate import init_empty_weights

    model_libraries()
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "config attributes were passed but are not expected" is no problem here
    try:
        with MODEL_BUILD_LOCK, init_empty_weights():  # one build at a time (diffcolor.method.libraries)
            if component.label in ("unet", "vae"):
                from diffusers import AutoencoderKL, UNet2DConditionModel

                model_class = UNet2DConditionModel if component.label == "unet" else AutoencoderKL
                return model_class.from_config(component.config)
            from transformers import (
                CLIPConfig,
                CLIPModel,
                CLIPTextConfig,
                CLIPTextModel,
            )

            if component.label == "text_encoder":
                return CLIPTextModel(CLIPTextConfig.from_pretrained(component.folder))
            return CLIPModel(CLIPConfig.from_pretrained(component.folder))
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _renamed_tensors(component: _Component, expected: dict) -> tuple[dict[str, tuple], set[str]]:
    """The header's tensors under the names from_pretrained loads them as; and those a converter reshapes."""
    shapes = {name: shape for name, (_, shape) in component.tensors.items()}
    if component.library == "diffusers":
        # Old checkpoints name the VAE's attention query/key/value/proj_attn; diffusers renames them (single files only).
        if not component.sharded and hasattr(component.module, "_fix_state_dict_keys_on_load"):
            shapes = dict(component.module._fix_state_dict_keys_on_load(dict(shapes)))
        return shapes, set()
    rename = _transformers_renamer(component.module, expected)
    renamed, converted = {}, set()
    for name, shape in shapes.items():
        new_name, reshaped = rename(name)
        renamed[new_name] = shape
        if reshaped:
            converted.add(new_name)
    return renamed, converted


def _transformers_renamer(module, expected: dict):
    """``rename(key) -> (loaded name, reshaped)`` as transformers' from_pretrained maps checkpoint keys.

    transformers 5 renames keys through the model's conversion mapping (for
    CLIPTextModel: checkpoints written with a ``text_model.`` prefix) and adds
    or strips the base-model prefix; earlier versions only do the latter.
    """
    prefix = getattr(module, "base_model_prefix", "") or ""

    def by_prefix(key: str) -> str:
        if prefix and key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") in expected:
            return key.removeprefix(f"{prefix}.")
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        return key

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return lambda key: (by_prefix(key), False)
    try:
        transforms = get_model_conversion_mapping(module)
    except Exception:  # internals of another transformers version: the base-model prefix rule still holds
        return lambda key: (by_prefix(key), False)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        new_key, converter = rename_source_key(key, renamings, converters, prefix or None, expected)
        if new_key not in expected and key in expected:  # as transformers does: the key was right as it was
            return key, False
        return new_key, converter is not None

    return rename


def _ignored_unexpected(module, name: str) -> bool:
    """Whether from_pretrained ignores an unexpected checkpoint key (its patterns; once-persistent position_ids)."""
    patterns = list(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or [])
    if any(buffer.endswith("position_ids") for buffer, _ in module.named_buffers()):
        patterns.append(r"(^|\.)position_ids$")
    return any(re.search(pattern, name) for pattern in patterns)


def _capped(check: Check, label: str, kind: str, lines: list[str]) -> None:
    """One problem per line up to MAX_TENSOR_LINES, then one that counts the rest."""
    for line in lines[:MAX_TENSOR_LINES]:
        check.problem(f"{label}: {kind} {line}")
    if len(lines) > MAX_TENSOR_LINES:
        check.problem(f"{label}: ... and {len(lines) - MAX_TENSOR_LINES} more ({kind})")


# ---------------------------------------------------------------------------
# 5. Consistency; 6. the scheduler.


def _check_consistency(configs: dict, components: dict[str, _Component]) -> Check:
    """The components fit together: text width to cross-attention, latent channels, token length to positions."""
    check = Check("consistency")
    unet, vae = configs.get("unet") or {}, configs.get("vae") or {}
    text = configs.get("text_encoder") or {}
    tokenizer = configs.get("tokenizer") or {}
    pairs = [
        ("text_encoder hidden_size", text.get("hidden_size"), "unet cross_attention_dim", unet.get("cross_attention_dim")),
        ("vae latent_channels", vae.get("latent_channels"), "unet in_channels", unet.get("in_channels")),
        ("vae latent_channels", vae.get("latent_channels"), "unet out_channels", unet.get("out_channels")),
        ("tokenizer model_max_length", tokenizer.get("model_max_length"),
         "text_encoder max_position_embeddings", text.get("max_position_embeddings")),
    ]
    agreeing = []
    for left, left_value, right, right_value in pairs:
        if left_value is None or right_value is None:
            if configs.get(left.split()[0]) is not None and configs.get(right.split()[0]) is not None:
                check.problem(f"{left if left_value is None else right} is not set in its config")
        elif left_value != right_value:
            check.problem(f"{left} {left_value} != {right} {right_value}: the components do not belong together")
        else:
            agreeing.append(f"{left.split()[1]} {left_value} = {right.split()[1]}")
    check.facts = {"cross_attention_dim": unet.get("cross_attention_dim"), "text_hidden_size": text.get("hidden_size"),
                   "latent_channels": vae.get("latent_channels"), "unet_in_channels": unet.get("in_channels"),
                   "model_max_length": tokenizer.get("model_max_length"),
                   "max_position_embeddings": text.get("max_position_embeddings"),
                   "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1)
                   if isinstance(vae.get("block_out_channels"), list) else None}
    check.summary = ", ".join(agreeing)
    # The working size: what a preset without model_pixels (default, paper-scale) runs at.
    sample_size, factor = unet.get("sample_size"), check.facts["vae_scale_factor"]
    if isinstance(sample_size, (int, list)) and factor:
        side = native_side(sample_size, factor)
        check.facts.update(sample_size=sample_size, native_side=side)
        check.summary += (f"; working size {side}x{side} (UNet sample_size {sample_size} x VAE factor {factor}; "
                          "a preset's model_pixels overrides it)")
    elif configs.get("unet") is not None and not isinstance(sample_size, (int, list)):  # a missing VAE is its own problem
        check.problem("unet sample_size is not set in its config: the working size cannot be known")
    return check


def _check_prompts(folder: Path, configs: dict, captions) -> Check:
    """The tokenizer loads; the identifier is one token; the anti-colour prompts and ``captions`` (rewritten) fit."""
    from diffcolor.common.captions import prompt_length_problems, rewrite_caption
    from diffcolor.common.errors import PromptError
    from diffcolor.method.models import prompt_limit
    from diffcolor.method.stage1 import ANTI_COLOR_PROMPTS
    from diffcolor.method.stage2 import Stage2Config

    check = Check("prompts")
    if configs.get("tokenizer") is None:
        check.summary = "no tokenizer config (see layout)"
        return check
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except Exception as error:  # transformers raises several classes for a broken tokenizer
        check.problem(f"the tokenizer does not load: {type(error).__name__}: {error}")
        return check
    limit = prompt_limit(tokenizer)
    stage2 = Stage2Config()
    pieces = tokenizer.tokenize(stage2.identifier)
    if len(pieces) != 1:
        check.problem(f"the identifier {stage2.identifier!r} is {len(pieces)} tokens for this tokenizer, not one")
    for number, prompt in enumerate(ANTI_COLOR_PROMPTS, start=1):
        problem = limit.problem(prompt, f"anti-colour prompt {number}")
        if problem:
            check.problem(problem)
    for number, caption in enumerate(captions, start=1):
        try:
            rewritten = rewrite_caption(caption, stage2.identifier, stage2.identifier_rule)
        except PromptError as error:
            check.problem(f"caption {number}: {error}")
            continue
        too_long = prompt_length_problems(limit, rewritten)
        for _, problem in too_long:
            check.problem(f"caption {number}: {problem}")
        if not too_long:
            check.details.append(f"caption {number}: {len(tokenizer.tokenize(rewritten.text)) + 2} of "
                                 f"{limit.model_max_length} tokens with its identifiers: {rewritten.text}")
    check.facts = {"model_max_length": limit.model_max_length, "identifier": stage2.identifier,
                   "identifier_rule": stage2.identifier_rule, "captions_checked": len(captions)}
    check.summary = (f"prompts up to {limit.model_max_length} tokens (start and end included), identifier "
                     f"{stage2.identifier!r} one token" + (f", {len(captions)} caption(s) checked" if captions else "")
                     + "; longer prompts are refused, never truncated")
    return check


def _check_scheduler(raw: dict | None) -> Check:
    """The DDIM sampler (and DDPM noise schedule) the method builds, its settings, and each correction as a note."""
    check = Check("scheduler")
    if raw is None:
        check.summary = "no scheduler config (see layout)"
        return check
    from diffcolor.method.diffusion import (
        build_noise_scheduler,
        build_sampling_scheduler,
        scheduler_settings,
    )

    try:
        _, corrections = scheduler_settings(raw)
        sampler = build_sampling_scheduler(raw)
        build_noise_scheduler(raw)
    except Exception as error:  # an unsupported prediction type, or a config diffusers rejects
        check.problem(f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error))
        check.facts = {"config_class": raw.get("_class_name")}
        check.summary = f"the method cannot build a sampler from scheduler_config.json ({raw.get('_class_name')})"
        return check
    config = sampler.config
    check.notes += corrections
    check.facts = {"config_class": raw.get("_class_name"), "class": type(sampler).__name__,
                   "clip_sample": config.clip_sample, "prediction_type": config.prediction_type,
                   "steps_offset": config.steps_offset, "timestep_spacing": config.timestep_spacing,
                   "set_alpha_to_one": config.set_alpha_to_one, "num_train_timesteps": config.num_train_timesteps,
                   "beta_schedule": config.beta_schedule, "corrections": corrections}
    check.summary = (f"{type(sampler).__name__} (config: {raw.get('_class_name')}): clip_sample "
                     f"{str(config.clip_sample).lower()}, prediction_type {config.prediction_type}, steps_offset "
                     f"{config.steps_offset}, timestep_spacing {config.timestep_spacing}")
    return check


# ---------------------------------------------------------------------------
# 7. CLIP, the random-weight marker, the device.


def _check_clip(clip_name: str | None, clip_folder: Path | None, component: _Component | None) -> Check:
    """The CLIP model load_models will use: its config, preprocessor config and tokenizer.

    Its weights are the weights check's; its config goes into ``component`` for the shapes check.
    """
    check = Check("clip")
    where = "the bundle's clip/" if clip_name is None else f"'{clip_name}'"
    check.facts = {"clip": clip_name, "folder": None if clip_folder is None else str(clip_folder)}
    if clip_folder is None:
        check.summary = f"{where} not found (see resolution)"
        return check
    config = _read_json(clip_folder / "config.json", check, "clip config.json")
    if config is not None and component is not None:
        component.config = config
        if config.get("model_type") not in (None, "clip"):
            check.problem(f"config.json is a {config.get('model_type')!r} model, not CLIP")
    preprocessor = _read_json(clip_folder / "preprocessor_config.json", check, "clip preprocessor_config.json")
    size = None
    if preprocessor is not None:
        crop = preprocessor.get("crop_size", 224)
        size = crop.get("height") if isinstance(crop, dict) else crop
        for key in ("image_mean", "image_std"):
            value = preprocessor.get(key)
            if not (isinstance(value, list) and len(value) == 3):
                check.problem(f"preprocessor_config.json has no three-channel {key}")
    if not _has_tokenizer_vocabulary(clip_folder):
        check.problem("clip tokenizer: neither tokenizer.json nor vocab.json with merges.txt")
    tokenizer = _read_json(clip_folder / "tokenizer_config.json", check, "clip tokenizer_config.json")
    text = (config or {}).get("text_config") or {}
    max_length = (tokenizer or {}).get("model_max_length")
    positions = text.get("max_position_embeddings", 77)  # CLIPTextConfig's default
    if max_length is not None and max_length != positions:
        check.problem(f"tokenizer model_max_length {max_length} != text max_position_embeddings {positions}")
    check.facts.update({"image_size": size, "model_max_length": max_length, "projection_dim": (config or {}).get("projection_dim")})
    check.summary = f"{where} at {clip_folder}: {size} px inputs, {max_length} tokens"
    return check


def _check_random_weights(folder: Path) -> Check:
    check = Check("random")
    random_weights = (folder / TINY_MARKER).exists()
    check.facts = {"random_weights": random_weights}
    if random_weights:
        check.notes.append("random weights: outputs will be labelled smoke runs")
        check.summary = f"{TINY_MARKER} present"
    else:
        check.summary = "no random-weight marker: real weights"
    return check


def _check_device(device: str, weight_dtype: str, components: dict[str, _Component], probe_memory: bool) -> Check:
    """Where the models will run, the frozen weights' storage dtype there (as load_models picks it) and their bytes."""
    import torch

    from diffcolor.method.performance import frozen_weight_dtype

    check = Check("device")
    cuda = torch.cuda.is_available()
    name = ("cuda" if cuda else "cpu") if device == "auto" else device
    try:
        target = torch.device(name)
    except RuntimeError:
        check.problem(f"device '{name}' is not a device name torch knows ('cpu', 'cuda', 'cuda:1', ...)")
        check.summary = f"'{name}'"
        return check
    storage = str(frozen_weight_dtype(weight_dtype, target)).removeprefix("torch.")
    facts = {"device": name, "cuda_available": cuda, "weight_dtype": storage}
    if target.type == "cuda" and not cuda:
        check.problem(f"device '{name}' asked for, but CUDA is not available here")
    weight_bytes = sum(_frozen_bytes(component, storage) for component in components.values())
    facts["frozen_weight_bytes"] = weight_bytes
    described = "CPU (no CUDA)" if target.type == "cpu" and not cuda else name
    if target.type == "cuda" and cuda:
        index = target.index if target.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        facts.update(device_name=properties.name, total_memory=properties.total_memory)
        described = f"{name} ({properties.name}, {properties.total_memory / 2**30:.1f} GiB"
        if probe_memory:
            facts["free_memory"] = torch.cuda.mem_get_info(index)[0]
            described += f", {facts['free_memory'] / 2**30:.1f} GiB free"
        described += ")"
        if weight_bytes > properties.total_memory:
            check.problem(f"the frozen weights take {weight_bytes:,} bytes in {storage}, more than the device's "
                          f"{properties.total_memory:,}")
        elif weight_bytes > facts.get("free_memory", weight_bytes):
            check.notes.append(f"the frozen weights ({weight_bytes:,} bytes) exceed the free memory now "
                               f"({facts['free_memory']:,} bytes)")
    elif cuda and target.type == "cpu":
        facts["device_name"] = torch.cuda.get_device_name(0)
    check.facts = facts
    check.summary = f"{described}: frozen weights in {storage}, {weight_bytes:,} bytes"
    return check


def _frozen_bytes(component: _Component, storage: str) -> int:
    """Bytes of ``component``'s weights once loaded and frozen: matrix layers in ``storage``, the rest as loaded.

    Without a module (its config did not build) every tensor counts at 4 bytes (fp32).
    """
    if component.module is None:
        return sum(4 * _numel(shape) for _, shape in component.tensors.values())
    from diffcolor.method.performance import MATRIX_LAYERS

    matrix = {f"{prefix}.{name}" if prefix else name
              for prefix, layer in component.module.named_modules() if isinstance(layer, MATRIX_LAYERS)
              for name in ("weight", "bias")}
    total = 0
    for name, tensor in component.module.state_dict().items():
        if not tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
        else:
            total += tensor.numel() * DTYPE_BYTES.get(storage if name in matrix else component.load_dtype, 4)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


def _one_line(text: str) -> str:
    """A message as one line (a library's multi-line error keeps its first line)."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else str(text)
