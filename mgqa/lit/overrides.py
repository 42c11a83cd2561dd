"""Command-line overrides that Hydra would refuse, named in one line with the names that do exist.

Hydra reports a mistyped key (``model.kv_head=2``), an unknown option of a group (``model=gqa_1b``),
an override it cannot parse and a value of the wrong type for a typed field (``model.dim=abc``) in
several lines, ending with advice about ``HYDRA_FULL_ERROR``.
The entry scripts compose their config with the command line's overrides before Hydra runs, and
turn such a refusal into one ``error:`` line: the override, and the closest existing key or the
group's options. Anything else is left to Hydra.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

_MULTIRUN_FLAGS = ("-m", "--multirun")
_NOT_OVERRIDABLE = re.compile(r"Could not override '([^']+)'")
_NOT_MERGEABLE = re.compile(r"Error merging override (.+)$")
_NOT_DELETABLE = re.compile(r"Could not delete from config\. '([^']+)' does not exist")


def compose_config(
    config_dir: Path, config_name: str, overrides: Sequence[str], hydra_node: bool = False
) -> DictConfig:
    """``config_name`` from ``config_dir`` with ``overrides``, as Hydra composes it (with its own
    ``hydra`` node where ``hydra_node``), the repository's resolvers registered."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from mgqa.lit.config import register_configs  # noqa: PLC0415 (the ${mgqa.repo_root:} resolver)

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_node)


def _one_value_each(args: Sequence[str]) -> Optional[list[str]]:
    """The overrides with each sweep (``a=1,2,4``) at its first value, as one job composes them;
    None where one cannot be read that way (an Optuna ``interval``, say): Hydra then judges."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
        lines = []
        for override in parsed:
            if not override.is_sweep_override():
                lines.append(override.input_line)
                continue
            prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
            lines.append(f"{prefix}{override.get_key_element()}={next(override.sweep_string_iterator())}")
        return lines
    except Exception:  # noqa: BLE001 (a parse error is reported by composing the raw line)
        return None


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    keys = []
    for name, value in node.items():
        key = f"{prefix}{name}"
        keys.append(key)
        keys += _keys(value, f"{key}.")
    return keys


def composition_error(err: BaseException, known_keys: Sequence[str] = (), args: Sequence[str] = ()) -> Optional[str]:
    """One line for Hydra's refusal of an override, or None for any other error.
    ``known_keys``: the config's dotted keys, for a "did you mean" on a mistyped one; ``args``: the
    overrides, to tell an option given there from one a config names in its defaults."""
    from hydra.errors import MissingConfigException, OverrideParseException  # noqa: PLC0415

    message = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if args and not any(arg.lstrip("+").startswith(f"{group}={option}") for arg in args):
            # Named by a config's defaults (conf/hydra/launcher/slurm.yaml names submitit_slurm): a plugin's.
            return (f"{err.missing_cfg_file}, which a chosen config builds on, was not found: is the Hydra plugin "
                    f"that provides it installed? ({group} has {', '.join(err.options)})")
        return f"{group}={option}: no such option; choose from {', '.join(err.options)}"
    if isinstance(err, OverrideParseException):
        first, *rest = message.splitlines()
        quoted = re.search(r"'(.*)'", first)
        what = f"cannot parse {quoted[0]}" if quoted else first
        return f"{what}: {rest[0]}" if rest else what
    match = _NOT_OVERRIDABLE.match(message)
    if match:
        key = match[1]
        depth = key.count(".")  # a sibling or a cousin, not a section: trainer.max_step -> trainer.max_steps
        candidates = [k for k in known_keys if k.count(".") == depth and not k.startswith("hydra.")]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
        if close:
            return f"{key} is not an option: did you mean {close[0]}?"
        parent = key.rpartition(".")[0]
        # Under an open section (trainer.*, callbacks.*) a new key can be meant: Hydra adds it with +.
        adds = f" (+{key}=... adds it to {parent})" if parent and parent in known_keys else ""
        return f"{key} is not an option{adds}"
    match = _NOT_MERGEABLE.match(message)
    if match and err.__cause__ is not None:  # a value of the wrong type for a typed field (model.*)
        return f"{match[1]}: {str(err.__cause__).splitlines()[0]}"
    match = _NOT_DELETABLE.match(message)
    if match:
        return f"~{match[1]}: there is no {match[1]} to remove"
    return None


def check_overrides(config_dir: Path, config_name: str, args: Sequence[str]) -> Optional[str]:
    """One line naming the override Hydra would refuse when composing ``config_name`` from
    ``config_dir`` with ``args`` (sweeps at their first value), or None where it would not (or
    fails for another reason, which Hydra then reports)."""
    lines = _one_value_each(args) or list(args)
    try:
        compose_config(config_dir, config_name, lines, hydra_node=True)
        return None
    except Exception as err:  # noqa: BLE001 (only Hydra's refusals are reported here)
        failure = err
    known: list[str] = []
    match = _NOT_OVERRIDABLE.match(str(failure))
    if match:  # the keys of the config composed without the refused override, for a suggestion
        rest = [line for line in lines if line.lstrip("+~").split("=", 1)[0] != match[1]]
        try:
            rest_cfg = compose_config(config_dir, config_name, rest, hydra_node=True)
            known = _keys(OmegaConf.to_container(rest_cfg, resolve=False))
        except Exception:  # noqa: BLE001 (no suggestion then)
            known = []
    return composition_error(failure, known, lines)


def refuse_bad_overrides(script: str, config_name: str, argv: Optional[Sequence[str]] = None) -> None:
    """Exit with one ``error:`` line if Hydra would refuse the command line's overrides.

    ``script``: the entry script's path (its ``conf/`` holds ``config_name``). Command lines with
    flags other than ``-m`` (``--cfg``, ``--help``, ``-cn``, ...) are left to Hydra.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in args if a not in _MULTIRUN_FLAGS]
    if not overrides or any(a.startswith("-") for a in overrides):
        return
    message = check_overrides(Path(script).resolve().parent / "conf", config_name, overrides)
    if message is not None:
        raise SystemExit(f"error: {Path(script).name}: {message}")
