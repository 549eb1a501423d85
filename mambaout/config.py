"""The run configuration: one typed schema, YAML files with `base:` inheritance, and `section.key=VALUE` overrides.

Every key, its type, default and help text live in the dataclasses below and nowhere else. The defaults are the
published MambaOut ImageNet-1k recipe, except the per-variant stochastic depth, which `configs/mambaout_*.yaml`
set. Values are checked when a config is built, so a mistake stops the run at start-up with one message naming
the key, where the value came from, what was expected and what was received.

A root schema (a `Schema` dataclass whose fields are the sections) describes one kind of run: `Config` the
ImageNet training of train.py; the fine-tuning commands have theirs (`mambaout.downstream.config`), built from
the same sections where they fit. Every function below takes the root schema it reads or builds (default
`Config`).
"""
import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Callable, Literal, NamedTuple, Sequence, Union, get_args, get_origin

import yaml


class ConfigError(Exception):
    """A config that cannot be used; the message says which key, from where, and what is wrong."""


class Check(NamedTuple):
    """A constraint beyond the type, e.g. `> 0`."""
    expect: str  # completes "expected <type> ..." in errors and the key listing
    ok: Callable[[Any], bool]


POSITIVE = Check("> 0", lambda v: v > 0)
NON_NEGATIVE = Check(">= 0", lambda v: v >= 0)
PROBABILITY = Check("in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION = Check("in [0, 1)", lambda v: 0 <= v < 1)  # drop rates, smoothing, decay: 1 would be degenerate
UNIT_RANGE = Check("with 0 < min <= max <= 1", lambda v: 0 < v[0] <= v[1] <= 1)
RANGE = Check("with 0 < min <= max", lambda v: 0 < v[0] <= v[1])
EACH_POSITIVE = Check("with each > 0", lambda v: all(x > 0 for x in v))
EACH_FRACTION = Check("with each in [0, 1)", lambda v: all(0 <= x < 1 for x in v))

Interpolation = Literal["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"]


def _key(default: Any, text: str, check: Check | None = None) -> Any:
    """A schema entry: its default, its help text and an optional constraint."""
    return field(default=default, metadata={"help": text, "check": check})


@dataclass
class ModelConfig:
    """The network and the weights it starts from."""
    name: str = _key("mambaout_small", "Architecture: a mambaout_* variant or any timm model name.")
    drop_path_rate: float = _key(
        0.0, "Stochastic depth of the last block (linspace from 0 over the blocks); 0 = off. Published: "
        "femto 0.025, kobe 0.025, tiny 0.2, small 0.4, base 0.6, set by configs/mambaout_*.yaml.", FRACTION)
    head_dropout: float = _key(0.0, "Dropout before the classifier's last Linear.", FRACTION)
    num_classes: int | None = _key(None, "Classifier outputs; null = the dataset's class count.", POSITIVE)
    checkpoint: str | None = _key(None, "Weight file to start from (any known layout); null = random init.")
    grad_checkpointing: bool = _key(False, "Recompute block activations in the backward pass to save memory.")
    freeze: Literal["none", "backbone"] = _key(
        "none", "Parameters kept fixed: 'backbone' trains the classifier's final Linear alone (linear probing), "
        "'none' trains everything.")


@dataclass
class DataConfig:
    """Where the images come from and how they are normalised."""
    root: str | None = _key(
        None, "Where the dataset is: the folder holding the train and val splits ('folder'), or for 'wds'/'parquet' "
        "a local path or any fsspec URL (s3://, gs://, https://, file://; credentials from the usual environment). "
        "Unused by 'synthetic'.")
    format: Literal["folder", "wds", "parquet", "synthetic"] = _key(
        "folder", "'folder': class folders of images under root; 'wds': timm's webdataset layout (tar shards listed "
        "by _info.json); 'parquet': Hugging Face's layout (image.bytes, label); 'synthetic': generated images "
        "(benchmarks, tests). docs/DATA.md, 'Shards and object storage'.")
    train_split: str = _key("train", "Split to train on: a sub-folder of root, or a split of the shards.")
    val_split: str = _key("val", "Split to evaluate on ('val' also finds a split named 'validation').")
    shuffle: Literal["global", "window"] = _key(
        "global", "Sample order per epoch: 'global' = a permutation of all samples; 'window' = shards permuted, "
        "then samples permuted within windows of data.shuffle_window shards (few large reads per host; shards "
        "only). Both keyed by (seed, epoch): the same on any number of hosts and workers.")
    shuffle_window: int = _key(16, "Shards per shuffle window (data.shuffle=window).", POSITIVE)
    cache_dir: str | None = _key(
        None, "This host's cache of shard ranges and indexes, shared by its processes; null = "
        "$XDG_CACHE_HOME/mambaout/data (~/.cache/mambaout/data).")
    cache_limit_gb: float = _key(
        50.0, "Most GiB the range cache keeps (oldest ranges deleted first); hold at least two shuffle windows.",
        POSITIVE)
    read_ahead_steps: int = _key(
        4, "Optimizer steps (or shuffle windows) whose reads each host plans and fetches ahead (URL roots).",
        NON_NEGATIVE)
    read_threads: int = _key(16, "Threads fetching planned reads per host.", POSITIVE)
    read_request_mb: float = _key(
        16.0, "Largest merged range request in MiB (S3 and GCS serve 8-16 MiB ranges best, fetched in parallel).",
        POSITIVE)
    read_gap_mb: float = _key(
        1.0, "Neighbouring ranges of a shard closer than this (MiB) are fetched in one request, gap included.",
        NON_NEGATIVE)
    read_retries: int = _key(
        8, "Tries of a read that fails transiently (timeouts, 5xx, resets; backoff from 0.25 s to 10 s) before the "
        "run stops at its last checkpoint.", POSITIVE)
    img_size: int = _key(224, "Training crop size in pixels.", POSITIVE)
    pipeline: Literal["auto", "timm", "tensor", "nvjpeg"] = _key(
        "timm", "Input pipeline (docs/DATA.md): 'timm' = timm's PIL transforms in the workers (the bit-exact "
        "reference); 'tensor' = tensor decoding and augmentation, keyed per sample like timm's; 'nvjpeg' = as "
        "tensor, JPEGs decoded on the GPU; 'auto' = nvjpeg on CUDA, else tensor. Evaluation follows the choice.")
    augment_on: Literal["auto", "device", "workers"] = _key(
        "auto", "Where the tensor pipelines run RandAugment, normalisation and erasing: 'device' = batched on the "
        "GPU/TPU (uint8 images travel), 'workers' = per sample in the data workers; 'auto' = device on CUDA and "
        "XLA, workers on CPU. The same ops either way.")
    num_workers: int = _key(8, "Data-loading worker processes per device; 0 = load in the main process.",
                            NON_NEGATIVE)
    synthetic_train_size: int = _key(
        1281167, "Images in the synthetic train set; ImageNet-1k's count, so epochs and the schedule have their "
        "real length (cut runs short with train.max_steps).", POSITIVE)
    synthetic_val_size: int = _key(50000, "Images in the synthetic val set (ImageNet-1k's count).", POSITIVE)
    synthetic_num_classes: int = _key(1000, "Classes of the synthetic data.", POSITIVE)
    mean: tuple[float, float, float] = _key((0.485, 0.456, 0.406), "Per-channel mean subtracted (ImageNet).")
    std: tuple[float, float, float] = _key((0.229, 0.224, 0.225), "Per-channel std divided by (ImageNet).",
                                           EACH_POSITIVE)


@dataclass
class OptimConfig:
    """AdamW and the batch it steps on."""
    global_batch_size: int = _key(
        4096, "Samples per optimizer step over all devices; gradient accumulation makes up the difference.", POSITIVE)
    base_lr: float = _key(1e-3, "Learning rate per 1024 samples: lr = base_lr x global_batch_size / 1024.", POSITIVE)
    lr: float | None = _key(None, "Peak learning rate; null = derived from base_lr (4e-3 for the recipe).", POSITIVE)
    weight_decay: float = _key(0.05, "Decoupled weight decay (not applied to biases and norm weights).",
                               NON_NEGATIVE)
    eps: float = _key(1e-8, "AdamW epsilon.", POSITIVE)
    betas: tuple[float, float] = _key((0.9, 0.999), "AdamW betas.", EACH_FRACTION)
    clip_grad: float | None = _key(None, "Clip the global gradient norm to this value; null = no clipping.",
                                   POSITIVE)
    layer_decay: float | None = _key(
        None, "Layer-wise lr decay for fine-tuning: a parameter of layer i of L (stem 0, then every block, "
        "downsamples with their stage's first block, the head last) gets lr x layer_decay^(L-1-i), as timm groups "
        "MetaFormer/ConvNeXt-style models; null = one lr for all (0.65-0.9 is usual).", Check(
            "in (0, 1]", lambda v: 0 < v <= 1))


@dataclass
class SchedConfig:
    """Learning-rate schedule: linear warm-up, cosine decay, then a constant cool-down, counted in epochs."""
    epochs: int = _key(300, "Length of the cosine, warm-up included; training runs epochs + cooldown_epochs.",
                       POSITIVE)
    warmup_epochs: int = _key(20, "Linear warm-up from warmup_lr to lr.", NON_NEGATIVE)
    cooldown_epochs: int = _key(10, "Epochs at min_lr after the cosine.", NON_NEGATIVE)
    warmup_lr: float = _key(1e-6, "Learning rate at the start of the warm-up.", NON_NEGATIVE)
    min_lr: float = _key(1e-5, "Learning rate at the end of the cosine and during the cool-down.", NON_NEGATIVE)
    per_step: bool = _key(False, "Update the lr every optimizer step; false = once per epoch, as the reference.")


@dataclass
class AugConfig:
    """Training augmentation, mixing and label smoothing (timm implementations)."""
    rand_augment: str | None = _key("rand-m9-mstd0.5-inc1", "timm RandAugment policy; null or '' = off.")
    random_erase_prob: float = _key(0.25, "Probability of random erasing per image.", PROBABILITY)
    random_erase_mode: Literal["const", "rand", "pixel"] = _key(
        "pixel", "Fill of erased boxes: zeros, one random color per box, or random per pixel.")
    random_erase_count: int = _key(1, "Maximum boxes erased per image.", POSITIVE)
    mixup_alpha: float = _key(0.8, "Mixup Beta(alpha, alpha); 0 = off.", NON_NEGATIVE)
    cutmix_alpha: float = _key(1.0, "CutMix Beta(alpha, alpha); 0 = off.", NON_NEGATIVE)
    mixup_prob: float = _key(1.0, "Probability of mixing a batch at all.", PROBABILITY)
    mixup_switch_prob: float = _key(0.5, "Probability of CutMix rather than Mixup when both are on.", PROBABILITY)
    mixup_mode: Literal["batch", "pair", "elem"] = _key("batch", "Draw mixing parameters per batch, pair or element.")
    label_smoothing: float = _key(0.1, "Label smoothing of the (mixed) targets.", FRACTION)
    crop_scale: tuple[float, float] = _key((0.08, 1.0), "Random-resized-crop area range, as fractions of the image.",
                                           UNIT_RANGE)
    crop_ratio: tuple[float, float] = _key((0.75, 4 / 3), "Random-resized-crop aspect-ratio range.", RANGE)
    hflip: float = _key(0.5, "Horizontal flip probability.", PROBABILITY)
    interpolation: Literal["random", Interpolation] = _key(
        "random", "Resize filter of the training crop; 'random' = bilinear or bicubic, drawn per image.")


@dataclass
class TrainConfig:
    """The training loop: devices' share of the batch, length, precision, EMA, logging and checkpoints."""
    micro_batch_size: int = _key(
        128, "Samples per device per forward/backward; accumulation fills optim.global_batch_size.", POSITIVE)
    max_steps: int | None = _key(None, "Stop after this many optimizer steps; null = run every epoch.", POSITIVE)
    seed: int = _key(42, "Seeds every random draw: sample order, augmentation, mixing, drop path.", NON_NEGATIVE)
    output_dir: str | None = _key(None, "Run folder (checkpoints, metrics, resolved config); null = runs/{model.name}.")
    precision: Literal["fp32", "bf16", "fp16"] = _key(
        "fp32", "Compute precision; the reference trained in fp32, bf16/fp16 run under autocast.")
    channels_last: bool = _key(True, "Keep activations in NHWC memory layout (faster convolutions on GPUs).")
    compile: bool = _key(False, "Compile the model with torch.compile.")
    ema: bool = _key(False, "Keep an exponential moving average of the weights.")
    ema_decay: float = _key(0.9999, "EMA decay per optimizer step.", FRACTION)
    log_interval: int = _key(50, "Log every this many optimizer steps.", POSITIVE)
    checkpoint_every_steps: int | None = _key(
        None, "Also checkpoint every this many optimizer steps; null = at epoch ends only.", POSITIVE)
    keep_checkpoints: int = _key(3, "Rolling checkpoints kept; older ones are deleted.", POSITIVE)
    skip_nonfinite: bool = _key(False, "Skip an optimizer step with a non-finite loss or gradient instead of failing.")


@dataclass
class EvalConfig:
    """Validation during training and in validate.py."""
    every_epochs: int = _key(1, "Evaluate every this many epochs.", POSITIVE)
    img_size: int | None = _key(None, "Evaluation resolution; null = data.img_size.", POSITIVE)
    crop_pct: float = _key(1.0, "Center-crop fraction: resize the short side to img_size / crop_pct, crop img_size.",
                           Check("in (0, 1]", lambda v: 0 < v <= 1))
    interpolation: Interpolation = _key("bicubic", "Resize filter for evaluation.")
    batch_size: int = _key(256, "Samples per device per evaluation batch.", POSITIVE)
    use_ema: bool = _key(False, "Evaluate the EMA weights instead of the trained ones.")


@dataclass
class RuntimeConfig:
    """The backend the run executes on."""
    device: Literal["auto", "cpu", "cuda", "tpu", "xla"] = _key(
        "auto", "Backend: 'tpu' = TPU through TorchTPU (one process per chip, torchrun), 'xla' = TPU through "
        "torch_xla (SPMD, one process per host); 'auto' = xla when PJRT_DEVICE is set, else tpu where TorchTPU "
        "sees chips, else cuda where available, else cpu.")
    dist_timeout_s: int = _key(1800, "Timeout of distributed collectives, in seconds.", POSITIVE)
    deterministic: bool = _key(
        False, "Deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic and not autotuned), "
        "so a resumed run is bit-identical on GPUs too, at a speed cost that scripts/gpu_check.sh measures; the "
        "recipes set true. XLA ignores it.")
    matmul_precision: Literal["highest", "high", "medium"] = _key(
        "highest", "fp32 matrix multiplies and convolutions: 'highest' true fp32 (the paper's reference), 'high' "
        "TF32 on NVIDIA GPUs (3 bf16 passes on TPUs), 'medium' bf16 (1 pass on TPUs, TorchTPU's default). "
        "Autocast (train.precision bf16/fp16) is unaffected.")
    peak_tflops: float | None = _key(
        None, "The device's peak dense TFLOP/s for the MFU column of steps.csv; null = from the table of known GPUs "
        "and TPUs (mambaout/runtime/peaks.py) for the run's math, no MFU on CPUs.", POSITIVE)


@dataclass
class TrackingConfig:
    """Experiment trackers: the resolved config, the manifest and every steps.csv and metrics.csv row go to them."""
    wandb: bool = _key(False, "Log to Weights & Biases (pip install wandb; `wandb login` first, or run offline).")
    wandb_project: str = _key("mambaout", "W&B project of the run (the W&B run is named after the run folder).")
    wandb_entity: str | None = _key(None, "W&B team or user; null = W&B's default (WANDB_ENTITY, else your own).")
    wandb_mode: Literal["auto", "online", "offline"] = _key(
        "auto", "'offline' writes the W&B run into the run folder's wandb/, for `wandb sync` later; 'auto' = W&B's "
        "own choice (WANDB_MODE, else online).")
    mlflow: bool = _key(False, "Log to MLflow (pip install mlflow).")
    mlflow_uri: str | None = _key(
        None, "MLflow tracking URI: a server (http://host:5000), a database (sqlite:///path/mlflow.db) or a folder "
        "(file:///path); null = MLflow's own choice (MLFLOW_TRACKING_URI, else its default).")
    mlflow_experiment: str = _key("mambaout", "MLflow experiment of the run (created when missing).")


class Schema:
    """Base of a root schema: a dataclass whose fields are the sections, each a dataclass of keys built by its
    default factory, in the order YAML, listings and diffs use."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain `{section: {key: value}}` with lists for tuples: what YAML and JSON can hold."""
        return {section: {f.name: _plain(getattr(getattr(self, section), f.name)) for f in fields(cls)}
                for section, cls in _sections(type(self)).items()}

    def derived(self, num_shards: int) -> Any:
        """The values a run on `num_shards` data shards derives from this config (a frozen dataclass), for
        --print-config and the run's records."""
        raise NotImplementedError


@dataclass
class Config(Schema):
    """A whole run: one instance per section, in this order everywhere (YAML, listings, diffs)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def derived(self, num_shards: int) -> "Derived":
        return derive(self, num_shards)


@functools.cache
def _sections(schema: type) -> dict[str, type]:
    return {f.name: f.type for f in fields(schema)}


@functools.cache
def _fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f"{s}.{f.name}": f for s, cls in _sections(schema).items() for f in fields(cls)}


@dataclass(frozen=True)
class Derived:
    """What follows from a config and the number of data shards; recorded with the config, never read back."""
    lr: float
    micro_batch_size: int
    num_shards: int
    accum_steps: int
    total_epochs: int
    eval_img_size: int
    output_dir: str


# --- loading -----------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so `1e-3`, `5e4` and `1.0e5` load
    as strings. YAML 1.2, JSON and people read them as numbers; configs are written by people.
    """


_Loader.add_implicit_resolver(  # copies SafeLoader's resolvers first, so yaml.safe_load is unaffected
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_config(path: str | Path | None, overrides: Sequence[str] = (), schema: type[Schema] = Config) -> Any:
    """The config of YAML file `path` (with its `base:` chain), then `overrides`; `path=None` = the defaults."""
    settings = {} if path is None else _read_file(Path(path), (), schema)
    for text in overrides:
        settings.update(_parse_override(text, schema))
    return _build(settings, schema)


def config_from_dict(doc: dict[str, Any], source: str = "<dict>", schema: type[Schema] = Config) -> Any:
    """The config of a `{section: {key: value}}` mapping (missing keys keep their defaults)."""
    flat = _flatten(_drop_derived(doc), source, schema)
    return _build({key: (value, f"{source}: {key}") for key, value in flat.items()}, schema)


def _read_file(path: Path, chain: tuple[Path, ...], schema: type[Schema]) -> dict[str, tuple[Any, str]]:
    """`{section.key: (value, where)}` of one file laid over its `base:` chain, so a file changes single keys."""
    if path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: 'base:' chain loops: {' -> '.join(map(str, (*chain, path)))}")
    try:
        with path.open() as stream:  # a stream, so YAML errors name the file
            doc = yaml.load(stream, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    doc = _drop_derived({} if doc is None else doc)
    settings: dict[str, tuple[Any, str]] = {}
    base = doc.pop("base", None) if isinstance(doc, dict) else None
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a file path relative to this file, got {_show(base)}")
        if not (path.parent / base).is_file():
            raise ConfigError(f"{path}: base {base!r} not found (looked for {path.parent / base})")
        settings = _read_file(path.parent / base, (*chain, path), schema)
    settings.update({key: (value, f"{path}: {key}") for key, value in _flatten(doc, str(path), schema).items()})
    return settings


def _drop_derived(doc: Any) -> Any:
    """`doc` without the `derived:` section that to_yaml writes for readers: it is recomputed on every run."""
    return {k: v for k, v in doc.items() if k != "derived"} if isinstance(doc, dict) else doc


def _parse_override(text: str, schema: type[Schema]) -> dict[str, tuple[Any, str]]:
    """`section.key=VALUE`, VALUE read as YAML: `[0.5, 1]` is a list, `null` (or nothing) is None."""
    where = f"override '{text}'"
    dotted, equals, raw = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not (equals and dot):
        raise ConfigError(f"{where}: expected section.key=VALUE, e.g. optim.lr=2e-3")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: VALUE is not valid YAML ({getattr(e, 'problem', e)})") from None
    return {k: (v, where) for k, v in _flatten({section: {key: value}}, where, schema).items()}


def _flatten(doc: Any, origin: str, schema: type[Schema]) -> dict[str, Any]:
    """`{section: {key: value}}` -> `{"section.key": value}`, refusing any name the schema does not have."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {_show(doc)}")
    flat, sections, known = {}, _sections(schema), _fields(schema)
    for section, body in doc.items():
        if section not in sections:
            close = difflib.get_close_matches(str(section), sections, n=2, cutoff=0.6)
            raise ConfigError(f"{origin}: unknown section {section!r}; " + _did_you_mean(close, sections))
        if body is None:  # every key commented out
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: section {section!r}: expected a mapping of keys, got {_show(body)}")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if dotted not in known:
                valid = [f"{section}.{f.name}" for f in fields(sections[section])]
                raise ConfigError(f"{origin}: unknown key {dotted!r}; "
                                  + _did_you_mean(_closest_keys(section, str(key), known), valid))
            flat[dotted] = value
    return flat


def _closest_keys(section: str, key: str, known: dict[str, dataclasses.Field]) -> list[str]:
    """Up to 3 valid keys nearest to `section.key` by name or initials (learning_rate ~ lr), own section first."""
    def forms(name: str) -> set[str]:
        words = name.split("_")
        return {name, "".join(word[:1] for word in words)} if len(words) > 1 else {name}

    def score(dotted: str) -> float:
        other_section, name = dotted.split(".")
        similarity = max(difflib.SequenceMatcher(None, a, b).ratio() for a in forms(key) for b in forms(name))
        return similarity + 0.1 * (other_section == section)

    return [k for k in sorted(known, key=score, reverse=True)[:3] if score(k) >= 0.6]


def _did_you_mean(close: list[str], valid: Sequence[str]) -> str:
    if not close:
        return "valid: " + ", ".join(valid)
    return "did you mean " + " or ".join(map(repr, close)) + "?"


# --- type checking -----------------------------------------------------------------------------------------------

class _Mismatch(Exception):
    """A value that is not of the schema type."""


def _build(settings: dict[str, tuple[Any, str]], schema: type[Schema]) -> Any:
    """A `schema` config with its defaults where `settings` (`{section.key: (value, where)}`) have no value; all
    checked. A root schema may give a section other defaults than the section's class (its default factory)."""
    defaults = schema()
    values: dict[str, dict[str, Any]] = {section: {} for section in _sections(schema)}
    for dotted, (value, where) in settings.items():
        section, key = dotted.split(".")
        values[section][key] = _convert(value, _fields(schema)[dotted], where)
    return schema(**{section: dataclasses.replace(getattr(defaults, section), **values[section])
                     for section in _sections(schema)})


def _convert(value: Any, f: dataclasses.Field, where: str) -> Any:
    try:
        converted = _coerce(value, f.type)
    except _Mismatch:
        raise ConfigError(f"{where}: expected {_describe(f.type)}, got {_show(value)}") from None
    check = f.metadata["check"]
    if converted is not None and check is not None and not check.ok(converted):
        raise ConfigError(f"{where}: expected {_describe(_non_null(f.type))} {check.expect}, got {_show(value)}")
    return converted


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`: ints widen to floats and lists become tuples; bools are never numbers."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        return None if value is None else _coerce(value, _non_null(tp))
    if origin is Literal:
        ok = isinstance(value, str) and value in args
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, t) for v, t in zip(value, args))
        ok = False
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    else:
        ok = isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool)
    if not ok:
        raise _Mismatch
    return value


def _non_null(tp: Any) -> Any:
    """`X` of `X | None`; any other type as it is."""
    if get_origin(tp) in (Union, UnionType):
        return next(arg for arg in get_args(tp) if arg is not NoneType)
    return tp


def _describe(tp: Any) -> str:
    """A type as errors and the key listing name it: 'int or null', "one of 'fp32', 'bf16'", 'list of 2 floats'."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        return f"{_describe(_non_null(tp))} or null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"list of {len(args)} {_describe(args[0])}s"
    return tp.__name__


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- derived values ----------------------------------------------------------------------------------------------

def derive(cfg: Config, num_shards: int) -> Derived:
    """The values a run on `num_shards` data shards uses that the config implies rather than states."""
    global_batch, micro = cfg.optim.global_batch_size, cfg.train.micro_batch_size
    accum_steps = accumulation_steps(global_batch, micro, num_shards)
    mixing = (cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0) and cfg.aug.mixup_prob > 0
    if mixing and micro % 2:
        raise ConfigError(f"train.micro_batch_size={micro} must be even with Mixup/CutMix on: each sample is "
                          "mixed with its mirror in the micro-batch (or set aug.mixup_alpha=0 aug.cutmix_alpha=0)")
    return Derived(
        lr=cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch / 1024,
        micro_batch_size=micro,
        num_shards=num_shards,
        accum_steps=accum_steps,
        total_epochs=cfg.sched.epochs + cfg.sched.cooldown_epochs,
        eval_img_size=eval_img_size(cfg),
        output_dir=cfg.train.output_dir or f"runs/{cfg.model.name}",
    )


def accumulation_steps(global_batch: int, micro: int, num_shards: int) -> int:
    """Micro-batches each shard runs per optimizer step; a split that does not divide the global batch is refused
    with the valid choices."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if global_batch % (micro * num_shards):
        raise ConfigError(_batch_split_error(global_batch, micro, num_shards))
    return global_batch // (micro * num_shards)


def eval_img_size(cfg: Config) -> int:
    """The evaluation resolution: `eval.img_size`, or the training size when it is null."""
    return cfg.eval.img_size if cfg.eval.img_size is not None else cfg.data.img_size


def _batch_split_error(global_batch: int, micro: int, num_shards: int) -> str:
    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    micros = divisors(global_batch // num_shards) if global_batch % num_shards == 0 else "none"
    shard_counts = divisors(global_batch // micro) if global_batch % micro == 0 else "none"
    return (f"optim.global_batch_size={global_batch} does not split into train.micro_batch_size={micro} "
            f"x {num_shards} shards x whole accumulation steps ({micro * num_shards} does not divide {global_batch}); "
            f"valid train.micro_batch_size for {num_shards} shards: {micros}; "
            f"valid shard counts for train.micro_batch_size={micro}: {shard_counts}")


# --- writing and comparing ---------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Lists in flow style (`crop_scale: [0.08, 1.0]`), sections in block style."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def to_yaml(cfg: Schema, derived: Any = None) -> str:
    """The resolved config as YAML in schema order, plus a `derived:` section (ignored when read back)."""
    doc: dict[str, Any] = cfg.to_dict()
    if derived is not None:
        doc["derived"] = dataclasses.asdict(derived)
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def diff_configs(a: Schema, b: Schema) -> list[tuple[str, Any, Any]]:
    """`(section.key, value in a, value in b)` for every key whose values differ, in schema order."""
    flat_a, flat_b = _flat_values(a), _flat_values(b)
    return [(key, flat_a[key], flat_b[key]) for key in flat_a if flat_a[key] != flat_b[key]]


def _flat_values(cfg: Schema) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, body in cfg.to_dict().items() for key, value in body.items()}


def describe_schema(schema: type[Schema] = Config) -> str:
    """Every key with its type, default and help, as Markdown tables (docs/CONFIG.md)."""
    lines, defaults = [], schema()
    for section, cls in _sections(schema).items():
        lines += [f"### `{section}`", "", cls.__doc__, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            check, value_type = f.metadata["check"], _non_null(f.type)
            kind = _describe(value_type) + (f" {check.expect}" if check else "")
            kind += " or null" if value_type is not f.type else ""
            default = json.dumps(_plain(getattr(getattr(defaults, section), f.name)))
            lines.append(f"| `{section}.{f.name}` | {kind} | `{default}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------------------------

def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, `KEY=VALUE` overrides, `--print-config` and `--help-config`."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="YAML config; it may inherit from another with 'base: FILE'")
    group.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="set a key, VALUE read as YAML: optim.lr=2e-3 aug.crop_scale=[0.5,1] model.checkpoint=null")
    group.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    group.add_argument("--help-config", action="store_true", help="list every config key and exit")


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, schema: type[Schema] = Config
              ) -> tuple[argparse.Namespace, Any]:
    """Parse `argv` with the config arguments added; a bad config exits with its message (status 2)."""
    add_config_args(parser)
    args = parser.parse_args(argv)
    return args, config_from_args(parser, args, schema=schema)


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     extra_overrides: Sequence[str] = (), schema: type[Schema] = Config) -> Any:
    """The config that parsed arguments describe: the file, then `extra_overrides` (a CLI's own flags),
    then the KEY=VALUE overrides. Handles --help-config and --print-config (which exit)."""
    if args.help_config:
        print(describe_schema(schema))
        parser.exit()
    try:
        cfg = load_config(args.config, [*extra_overrides, *args.overrides], schema)
        if args.print_config:
            # Derived values for the world this command runs in (torchrun sets WORLD_SIZE; alone it is 1).
            print(to_yaml(cfg, cfg.derived(int(os.environ.get("WORLD_SIZE", 1)))), end="")
            parser.exit()
    except ConfigError as e:
        parser.error(str(e))
    return cfg
