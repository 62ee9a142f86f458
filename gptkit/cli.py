"""The command line of every entry point: `--key=value` options parsed into the typed Config, `--help` generated from
the dataclasses' own field documentation, and one-line errors with exit code 2.

    python train.py --preset=tiny --n_layer=8 --learning_rate=1e-3
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable

from config import PRESETS, Config, ConfigError, ModelConfig, UserError, require_choice


def parse_bool(name: str, raw: str) -> bool:
    """--name=True/False (also 1/0, yes/no, on/off), or a ConfigError naming the option."""
    lowered = str(raw).lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{name}={raw} is not a boolean; use --{name}=True or --{name}=False")


def default_preset() -> str:
    """`small` where a GPU is present, `tiny` on a CPU (the 30M model takes hours per epoch on 2 cores)."""
    import torch
    return "small" if torch.cuda.is_available() or torch.backends.mps.is_available() else "tiny"


def _sections(config: Config) -> dict[str, object]:
    """Map each field name to the dataclass that holds it; names are unique across sections."""
    owners = {}
    for section in (config.model, config.train, config.data):
        for f in dataclasses.fields(section):
            owners[f.name] = section
    return owners


def _parse_value(key: str, raw: str, annotation):
    """Convert the command-line string to the field's declared type, or raise a ConfigError saying what was wanted."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in hints and raw.lower() in ("none", "auto", ""):
        return None
    base = next(h for h in hints if h is not type(None))
    if base is bool:
        return parse_bool(key, raw)
    if base is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)  # allow 1e4 for an integer field
            raise ConfigError(f"--{key}={raw} is not an integer; use e.g. --{key}=8") from None
    if base is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--{key}={raw} is not a number; use e.g. --{key}=3e-4") from None
    return raw


class ParsedArgs(typing.NamedTuple):
    config: Config
    options: dict[str, object]  # the entry point's own options (not config fields), defaults filled in
    overridden: frozenset[str]  # config fields the user set explicitly, as opposed to the preset's values


def parse_args(argv: list[str], extra: dict[str, object] | None = None, preset: str | None = None,
               defaults: dict[str, object] | None = None) -> ParsedArgs:
    """Build a validated Config from `--preset=NAME --key=value ...`.

    `extra` declares entry-point options that are not config fields (e.g. generate.py's --prompt), with their
    defaults. `preset` replaces the device-dependent default preset (e.g. a test pinning `tiny`). `defaults` are an
    entry point's own values for config fields (the fine-tuning scripts' learning rate): they replace the preset's
    before the command line is applied and validated, so `--learning_rate` alone keeps their min_lr/learning_rate.
    """
    extra = dict(extra or {})
    pairs: list[tuple[str, str]] = []
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            value = "True"  # a bare flag, e.g. --resume
        pairs.append((key, value))

    preset_name = preset
    for key, value in pairs:
        if key == "preset":
            preset_name = value
    if preset_name is None:
        preset_name = default_preset()
    if preset_name not in PRESETS:
        require_choice("preset", preset_name, tuple(PRESETS))
    config = _preset_with_defaults(preset_name, defaults or {})

    owners = _sections(config)
    options = dict(extra)
    overridden = set()
    for key, value in pairs:
        if key == "preset":
            continue
        if key in owners:
            section = owners[key]
            annotation = typing.get_type_hints(type(section))[key]
            setattr(section, key, _parse_value(key, value, annotation))
            overridden.add(key)
        elif key in extra:
            default = extra[key]
            annotation = type(default) if default is not None else str
            if isinstance(default, bool):
                annotation = bool
            options[key] = _parse_value(key, value, annotation)
        else:
            known = list(owners) + list(extra) + ["preset"]
            close = ", ".join("--" + c for c in difflib.get_close_matches(key, known, n=3, cutoff=0.6))
            hint = f"; did you mean {close}?" if close else "; config.py lists the fields"
            raise ConfigError(f"unknown option --{key}{hint}")
    preset_train = _preset_with_defaults(preset_name, defaults or {}).train
    scale = config.train.learning_rate / preset_train.learning_rate
    if "learning_rate" in overridden and "min_lr" not in overridden:
        config.train.min_lr = preset_train.min_lr * scale  # keep the preset's decay
    if "learning_rate" in overridden and "muon_lr" not in overridden and preset_train.optimizer == "muon":
        config.train.muon_lr = preset_train.muon_lr * scale  # one rate moves the preset's whole recipe
    config.validate()
    return ParsedArgs(config, options, frozenset(overridden))


def _preset_with_defaults(name: str, defaults: dict[str, object]) -> Config:
    config = PRESETS[name]()
    config.preset = name
    owners = _sections(config)
    for key, value in defaults.items():
        setattr(owners[key], key, value)
    return config


def merge_resume_config(saved: Config, parsed: Config, overridden: frozenset[str],
                        also_fixed: tuple[str, ...] = ()) -> Config:
    """The saved run's config, with the user's explicit overrides on top (e.g. more max_iters) where they are safe;
    one that would change what the checkpoint holds (the model's sizes, the data, the optimizer) is refused.
    `also_fixed` names more fields a resume may not change (the fine-tuning splits' val_fraction)."""
    fixed = {f.name for f in dataclasses.fields(ModelConfig)} - {"dropout"}
    fixed |= {"tokenizer", "dataset", "data_dir", "batch_size", "gradient_accumulation_steps", "sampling", "seed",
              "optimizer"}  # a checkpoint's optimizer state fits only the optimizer that wrote it
    fixed |= set(also_fixed)
    for key in sorted(overridden):
        if key in ("resume", "out_dir", "run_name"):
            continue
        new = getattr(_sections(parsed)[key], key)
        target = _sections(saved)[key]
        old = getattr(target, key)
        if key in fixed and new != old:
            raise ConfigError(f"--{key}={new} contradicts the run being resumed ({key}={old}); "
                              "drop the override or start a new run with another --out_dir")
        setattr(target, key, new)
    saved.train.resume = True
    return saved.validate()


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point: a UserError becomes one line on stderr and exit code 2; anything else is a bug."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
