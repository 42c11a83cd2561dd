"""The entry scripts' check of command-line overrides: Hydra's refusals in one line, nothing else refused."""

import re
import shlex
import subprocess
import sys

import pytest

from mgqa.lit.overrides import check_overrides, composition_error, refuse_bad_overrides
from tests.conftest import ROOT

SCRIPTS = {"train.py": "train", "generate.py": "generate", "evaluate.py": "evaluate", "export.py": "export"}


def documented_command_lines():
    """Every `python <script>.py ...` line of the README and docs/, as (script, overrides)."""
    lines = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().replace("\\\n", " ").splitlines():  # continued lines joined
            match = re.match(r"^\s*python (train|generate|evaluate|export)\.py((?: [^#`]*)?)(?:#.*)?$", line)
            if match:
                lines.append((f"{match[1]}.py", shlex.split(match[2])))
    return lines


def test_every_documented_command_line_passes():
    lines = documented_command_lines()
    assert len(lines) >= 20 and {script for script, _ in lines} == set(SCRIPTS)
    for script, args in lines:
        overrides = [a for a in args if a not in ("-m", "--multirun")]
        if any(a.startswith("-") for a in overrides):
            continue  # --cfg job, --help: left to Hydra
        assert check_overrides(ROOT / "conf", SCRIPTS[script], overrides) is None, (script, args)


@pytest.mark.parametrize("args", [
    ["+trainer.profiler=simple"],  # a key added under an open section
    ["-m", "model.kv_heads=1,2,4,8", "trainer=ddp", "trainer.devices=4"],
    ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3"],
    ["~callbacks.model_checkpoint", "optim.optimizer.lr=1e-3"],
    ["--cfg", "job", "model.kv_head=2"],  # flags other than -m: Hydra decides
])
def test_valid_command_lines_and_hydra_flags_pass(args):
    refuse_bad_overrides(str(ROOT / "train.py"), "train", args)  # returns: no SystemExit


@pytest.mark.parametrize("args, message", [
    (["model.kv_head=2"], "model.kv_head is not an option: did you mean model.kv_heads?"),
    (["trainer.devicse=2"], "trainer.devicse is not an option: did you mean trainer.devices?"),
    (["trainer.profilr=simple"], "trainer.profilr is not an option (+trainer.profilr=... adds it to trainer)"),
    (["nosuch=1"], "nosuch is not an option"),
    (["-m", "model.kv_heads=1,2", "modle.dim=64"], "modle.dim is not an option: did you mean model.dim?"),
    (["optim=sgd"], "optim=sgd: no such option; choose from adamw"),
    (["~model.nope"], "~model.nope: there is no model.nope to remove"),
    (["model.dim=abc"], "model.dim=abc: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_refusals_name_the_override_and_what_exists(args, message):
    with pytest.raises(SystemExit) as exc:
        refuse_bad_overrides(str(ROOT / "train.py"), "train", args)
    assert str(exc.value) == f"error: train.py: {message}"


def test_an_option_a_config_builds_on_points_at_a_missing_plugin():
    from hydra.errors import MissingConfigException

    err = MissingConfigException("Could not find 'hydra/launcher/submitit_slurm'", "hydra/launcher/submitit_slurm",
                                 ["basic", "slurm"])
    assert composition_error(err, args=["-m", "hydra/launcher=slurm"]) == (
        "hydra/launcher/submitit_slurm, which a chosen config builds on, was not found: is the Hydra plugin that "
        "provides it installed? (hydra/launcher has basic, slurm)")
    assert composition_error(err, args=["hydra/launcher=submitit_slurm"]) == (
        "hydra/launcher=submitit_slurm: no such option; choose from basic, slurm")
    assert composition_error(ValueError("anything else")) is None  # left to Hydra


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_mistyped_option_is_refused_before_torch_is_imported(script):
    """The check runs first and needs only Hydra: the refusal comes back at once, not after the
    seconds torch and Lightning take to import."""
    probe = (f"import runpy, sys; sys.argv = [{script!r}, 'no_such_key=1']\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
             "finally:\n    print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "no_such_key is not an option" in proc.stderr
    assert proc.stdout.strip() == "torch not imported"
