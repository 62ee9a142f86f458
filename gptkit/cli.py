"""The command line of every entry point: `--key=value` options parsed into the typed Config, `--help` generated from
the dataclasses' own field documentation, and one-line errors with exit code 2.

    python train.py --preset=tiny --n_layer=8 --learning_rate=1e-3
    python train.py --help

The help text of an option is the trailing `# comment` on its line: on a field of a config.py dataclass, or on an
entry of an entry point's OPTIONS dict. It is read from the source, so the help cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Collection
from pathlib import Path

from config import PRESETS, Config, ConfigError, DataConfig, ModelConfig, TrainConfig, UserError, require_choice

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
READS_ALL = ("preset", *SECTIONS)  # what most entry points read: a preset and every config field


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


def _fields_read(reads: Collection[str]) -> dict[str, str]:
    """Each config field an entry point reads -> its section; `reads` names sections ("train") or fields ("seed")."""
    fields = {}
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            if section in reads or f.name in reads:
                fields[f.name] = section
    unknown = set(reads) - set(fields) - set(READS_ALL)
    if unknown:
        raise ValueError(f"reads names no config section or field: {sorted(unknown)}")  # a bug in the entry point
    return fields


FIELD_SECTIONS = _fields_read(SECTIONS)  # every config field -> "model", "train" or "data"

# What the TrainConfig fields that a command which does not train (generate, chat, serve) reads mean there: --help
# lists them as "runtime options" with these words, not with train.py's (a seed that seeds "the weights").
RUNTIME_HELP = {
    "device": "where the model runs; auto: cuda, then mps, then cpu",
    "dtype": "the precision of the forward pass; auto: bfloat16 where the device supports it, else float16 on "
             "CUDA, else float32",
    "seed": "seeds the sampling: the same seed, model and options give the same text",
    "fast_kernels": "the CPU fast paths of fast.py; False runs model.py's plain path",
    "init_from": "scratch: a checkpoint of this repository (--ckpt, --run or the latest run); gpt2 (-medium, "
                 "-large, -xl): OpenAI's weights; or a Hugging Face folder",
}


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


def _option_type(default) -> type:
    """An entry point's option takes the type of its default; None and a list (a repeatable option) take text."""
    if default is None or isinstance(default, list):
        return str
    return type(default)


def _split_pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--key=value` arguments as (key, value); a bare `--flag` has the value None; anything else is refused with its
    fix."""
    pairs = []
    for index, arg in enumerate(argv):
        if not arg.startswith("--"):
            raise ConfigError(_not_an_option(arg, argv[index - 1] if index else ""))
        key, eq, value = arg[2:].partition("=")
        pairs.append((key.replace("-", "_"), value if eq else None))  # None: a bare flag, e.g. --resume
    return pairs


def _not_an_option(arg: str, previous: str) -> str:
    """The one-line error for a word that is not --key=value, showing the fix by example."""
    message = f"argument {arg!r} is not of the form --key=value"
    quote = "'" if '"' in arg else '"'
    if previous.startswith("--") and "=" not in previous:  # `--prompt ROMEO:`: the shell split an option from its value
        return f"{message}; join it to its option with =: {previous}={quote}{arg}{quote}"
    if "=" in arg:  # `n_layer=3`
        return f"{message}; write --{arg}"
    return f"{message}; write options as --key=value, quoting a value with spaces: --key={quote}{arg}{quote}"


class ParsedArgs(typing.NamedTuple):
    config: Config
    options: dict[str, object]  # the entry point's own options (not config fields), defaults filled in
    overridden: frozenset[str]  # config fields the user set explicitly, as opposed to the preset's values


def parse_args(argv: list[str], extra: dict[str, object] | None = None, preset: str | None = None,
               reads: Collection[str] = READS_ALL, usage: str = "", defaults: dict | None = None,
               meanings: dict[str, str] | None = None) -> ParsedArgs:
    """Build a validated Config from `--preset=NAME --key=value ...`, or print the help and exit 0 on --help / -h.

    `extra` declares entry-point options that are not config fields (an OPTIONS dict, e.g. generate.py's --prompt),
    with their defaults; a list default makes an option that may be given several times. `preset` replaces the
    device-dependent default preset (e.g. a test pinning `tiny`). `reads` says which config sections ("train") or
    fields ("seed") the entry point uses, and "preset" when it takes one: the others are refused, not ignored, and
    --help lists only these. `usage` replaces the help's first line, `python X.py [--key=value ...]`. `defaults`
    are an entry point's own values for config fields (the fine-tuning scripts' learning rate): they replace the
    preset's before the command line is applied and validated, so `--learning_rate` alone keeps their ratio of
    min_lr to learning_rate, and `--max_iters` alone shortens a warmup longer than a tenth of the run (of
    lr_decay_iters when given) to that tenth. `meanings` replace config.py's help of some fields in this command's
    --help, where a field means something else here (the fine-tuning scripts' --init_from).
    """
    extra, defaults = dict(extra or {}), dict(defaults or {})
    if "--help" in argv or "-h" in argv:
        chosen = next((a.partition("=")[2] for a in argv if a.startswith("--preset=") and "preset" in reads), None)
        try:
            print(help_text(sys.modules["__main__"], extra, reads, preset, usage, defaults, chosen, meanings),
                  flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    pairs = _split_pairs(argv)
    preset_name = _choose_preset(pairs, preset, reads)
    config = _preset_with_defaults(preset_name, defaults)
    fields = _fields_read(reads)
    options = {key: list(value) if isinstance(value, list) else value for key, value in extra.items()}
    overridden = set()
    for key, value in pairs:
        if key == "preset" and "preset" in reads:
            continue
        if value is None:  # a bare --flag: True for a switch; a text option (empty by default) has no value
            default = extra[key] if key in extra else \
                getattr(getattr(config, fields[key]), key) if key in fields else False
            kind = typing.get_type_hints(type(getattr(config, fields[key])))[key] if key in fields and \
                key not in extra else _option_type(default)
            switch = bool in (typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,))
            if (default is None or default == "") and not switch:
                raise ConfigError(f"--{key} was given no value; write --{key}=VALUE (quote a value with spaces: "
                                  f"--{key}=\"two words\")")
            value = "True"
        if key in extra:  # the entry point's own options come first: sweep.py's --out_dir is not train.py's
            parsed = _parse_value(key, value, _option_type(extra[key]))
            if isinstance(extra[key], list):
                options[key].append(parsed)
            else:
                options[key] = parsed
        elif key in fields:
            section = getattr(config, fields[key])
            setattr(section, key, _parse_value(key, value, typing.get_type_hints(type(section))[key]))
            overridden.add(key)
        else:
            raise ConfigError(_not_read(key, fields, extra, reads))
    preset_train = _preset_with_defaults(preset_name, defaults).train
    scale = config.train.learning_rate / preset_train.learning_rate
    if "learning_rate" in overridden and "min_lr" not in overridden:
        config.train.min_lr = preset_train.min_lr * scale  # keep the preset's decay
    if "learning_rate" in overridden and "muon_lr" not in overridden and preset_train.optimizer == "muon":
        config.train.muon_lr = preset_train.muon_lr * scale  # one rate moves the preset's whole recipe
    train = config.train
    horizon = train.lr_decay_iters or train.max_iters  # the schedule's length: a resume that runs on keeps it
    if {"max_iters", "lr_decay_iters"} & overridden and "warmup_iters" not in overridden and \
            train.warmup_iters * 10 > horizon:
        train.warmup_iters = horizon // 10  # the schedule shrinks with a short run, warmup included
    if "arch" in overridden:
        config.model.apply_arch(keep=overridden)  # --arch=llama sets its switches; --norm=... beside it wins
    config.validate()
    return ParsedArgs(config, options, frozenset(overridden))


def _choose_preset(pairs: list[tuple[str, str]], preset: str | None, reads: Collection[str]) -> str:
    """--preset=NAME, else the entry point's own choice, else the default for this machine."""
    for key, value in pairs:
        if key == "preset" and "preset" in reads:
            preset = value
    if preset is None:  # an entry point that takes no preset need not import torch to choose one
        preset = default_preset() if "preset" in reads else "small"
    require_choice("preset", preset, tuple(PRESETS))
    return preset


def _not_read(key: str, fields: dict[str, str], extra: dict, reads: Collection[str]) -> str:
    """The error for an option this entry point does not take: a config field it does not read, or a typo."""
    if key in FIELD_SECTIONS or key == "preset":
        if not fields:
            return f"unknown option --{key}: this command sets no config field (--help lists its options)"
        names = ", ".join("--" + name for name in fields)
        return f"--{key} has no effect here: of the config fields this command reads only {names} (--help lists them)"
    known = list(fields) + list(extra) + (["preset"] if "preset" in reads else [])
    close = ", ".join("--" + c for c in difflib.get_close_matches(key, known, n=3, cutoff=0.6))
    return f"unknown option --{key}" + (f"; did you mean {close}?" if close else "; --help lists the options")


def _preset_with_defaults(name: str, defaults: dict[str, object]) -> Config:
    config = PRESETS[name]()
    config.preset = name
    for key, value in defaults.items():
        setattr(getattr(config, FIELD_SECTIONS[key]), key, value)
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
        new = getattr(getattr(parsed, FIELD_SECTIONS[key]), key)
        target = getattr(saved, FIELD_SECTIONS[key])
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


# ----------------------------------------------------------------------------------------------------------------
# --help: each option's text is the trailing comment on its line in the source


def trailing_comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment that ends that line after code; a comment alone on a line is a note
    for the reader, not help."""
    comments, code_lines = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            if token.start[0] in code_lines:
                comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(token.start[0], token.end[0] + 1))  # a multi-line string covers all its lines
    return comments


def _comment_over(first: ast.AST, last: ast.AST, comments: dict[int, str]) -> str:
    """The trailing comments on the lines from `first` to `last`, so a default that spans lines keeps its help."""
    return " ".join(comments[line] for line in range(first.lineno, last.end_lineno + 1) if line in comments)


@functools.cache
def field_help(kind: type) -> dict[str, str]:
    """Each field of a dataclass -> its help: the trailing comment of its line(s) in the class's source."""
    source = inspect.getsource(kind)
    comments = trailing_comments(source)
    names = {f.name for f in dataclasses.fields(kind)}
    body = ast.parse(source).body[0].body
    return {node.target.id: _comment_over(node, node, comments) for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names}


def options_help(source: str) -> dict[str, str]:
    """Each entry of a module's top-level OPTIONS dict -> its help: the trailing comment of the entry's line(s)."""
    comments = trailing_comments(source)
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "OPTIONS" and isinstance(node.value, ast.Dict):
            return {key.value: _comment_over(key, value, comments) for key, value in zip(node.value.keys,
                                                                                     node.value.values)
                    if isinstance(key, ast.Constant)}
    return {}


def command_of(module: types.ModuleType) -> str:
    """How the entry point is run: `python train.py`, or `python -m tools.bench` for a module in a package."""
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else module.__name__
    if name == "__main__":  # `python train.py`: no spec, the file says which script it is
        return f"python {Path(module.__file__).name}"
    return f"python -m {name}" if "." in name else f"python {name}.py"


def _doc_head(doc: str | None) -> str:
    """A docstring's first paragraph and the indented example commands right after it."""
    paragraphs = (doc or "").strip().split("\n\n")
    head = [paragraphs[0]]
    for paragraph in paragraphs[1:]:
        if not all(line.startswith(" ") for line in paragraph.splitlines()):
            break
        head.append(paragraph)
    return "\n\n".join(head)


def _describe_default(value, none: str = "None") -> str:
    if isinstance(value, str):
        return json.dumps(value)  # "" shows that the default is empty
    if isinstance(value, list):
        return "none"
    return none if value is None else str(value)


def _type_name(annotation) -> str:
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    name = " or ".join(h.__name__ for h in hints if h is not type(None))
    return name + " or auto" if type(None) in hints else name


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    """Rows of (--name, type, default, help) in aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
            for row in rows]


def help_text(module: types.ModuleType, extra: dict[str, object], reads: Collection[str] = READS_ALL,
              preset: str | None = None, usage: str = "", defaults: dict | None = None,
              chosen: str | None = None, meanings: dict[str, str] | None = None) -> str:
    """The --help of an entry point: usage, its docstring's head, the presets, then its options and the config
    fields it reads, section by section, each with type, default and help. The arguments are parse_args's; `chosen`
    is a --preset given beside --help, whose values the help then shows. A command that does not train lists the
    train fields it reads (device, dtype, seed) as runtime options, in RUNTIME_HELP's words."""
    command = command_of(module)
    lines = [f"usage: {usage or command + ' [--key=value ...]'}", "", _doc_head(module.__doc__), ""]
    fields = _fields_read(reads)
    if "preset" in reads:
        where = "this command's default" if preset else "the default on this machine"
        preset = preset or default_preset()
        names = ", ".join(f"{name} ({where})" if name == preset else name for name in PRESETS)
        own = f" (this command sets {len(defaults)} of them its own way)" if defaults else ""
        lines += [f"presets: --preset=NAME sets every model and train field at once; the defaults below are "
                  f"{chosen or preset}'s{own}", f"  {names}", ""]
    preset = chosen or preset
    if extra:
        helps = options_help(inspect.getsource(module))
        if dataclasses.is_dataclass(getattr(module, "OPTIONS_CONFIG", None)):  # dpo.py's DPOConfig, rl.py's RLConfig
            helps.update(field_help(module.OPTIONS_CONFIG))
        rows = [(f"--{key}", ("repeatable " if isinstance(default, list) else "") + _option_type(default).__name__,
                 _describe_default(default), helps.get(key, "")) for key, default in extra.items()]
        lines += [f"{command.split()[-1]} options:", *_table(rows), ""]
    config = PRESETS[preset or "small"]()
    for key, value in (defaults or {}).items():  # the entry point's own, as parse_args sets them
        setattr(getattr(config, FIELD_SECTIONS[key]), key, value)
    runtime = {} if "train" in reads else {name: text for name, text in RUNTIME_HELP.items() if name in fields}
    for section, kind in SECTIONS.items():
        hints, helps = typing.get_type_hints(kind), {**field_help(kind), **RUNTIME_HELP, **(meanings or {})}
        for title, names in ((f"{section} options ({kind.__name__} in config.py):",
                              [n for n in fields if fields[n] == section and n not in runtime]),
                             (f"runtime options (fields of {kind.__name__} in config.py, as this command uses them):",
                              [n for n in fields if fields[n] == section and n in runtime])):
            rows = [(f"--{name}", _type_name(hints[name]),
                     _describe_default(getattr(getattr(config, section), name), none="auto"),
                     helps[name] if name in runtime or name in (meanings or {}) else field_help(kind)[name])
                    for name in names]
            if rows:
                lines += [title, *_table(rows), ""]
    lines.append("Write every option as --key=value (quote a value that has spaces: --key=\"two words\"); a bare "
                 "--flag means --flag=True.")
    return "\n".join(lines)
