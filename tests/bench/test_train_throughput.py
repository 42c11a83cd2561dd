"""bench/train_throughput.py's Inductor settings: read from the command line, applied per variant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch._inductor.config as inductor_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput as tt  # noqa: E402


def test_settings_are_read_as_typed_values_of_inductors_config():
    assert tt.inductor_settings("default") == {}
    assert tt.inductor_settings("triton.persistent_reductions=False, triton.multi_kernel=1") == {
        "triton.persistent_reductions": False, "triton.multi_kernel": 1}
    assert tt.inductor_settings("triton.persistent_reductions=0") == {"triton.persistent_reductions": False}
    assert tt.inductor_settings("coordinate_descent_tuning=True") == {"coordinate_descent_tuning": True}


@pytest.mark.parametrize("text,message", [
    ("triton.no_such_setting=1", "'triton.no_such_setting' is not a setting of torch._inductor.config"),
    ("triton.persistent_reductions=maybe", "triton.persistent_reductions=maybe: expected True/False or 1/0"),
    ("triton.persistent_reductions=2", "triton.persistent_reductions=2: expected True/False or 1/0"),
    ("triton.multi_kernel=1.5", "triton.multi_kernel=1.5: expected an integer"),
    ("triton.multi_kernel", "'triton.multi_kernel': expected KEY=VALUE"),
])
def test_a_bad_setting_is_refused_naming_it(text, message):
    with pytest.raises(ValueError) as err:
        tt.inductor_settings(text)
    assert str(err.value) == message


def test_a_bad_setting_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        tt.main(["--inductor", "default", "--inductor", "triton.no_such_setting=1"])
    assert exit_.value.code == 2
    assert "--inductor: 'triton.no_such_setting' is not a setting of torch._inductor.config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tt.main(["--rounds", "0"])
    assert "--rounds (0) must be at least 1" in capsys.readouterr().err


def test_each_variant_runs_under_its_settings_and_a_failure_becomes_a_row(monkeypatch):
    seen = []

    def fake_time_impl(impl, shape, *args):
        seen.append((impl, inductor_config.triton.persistent_reductions))
        if impl == "mgqa_compiled_triton":
            raise RuntimeError("out of resources")
        return {"impl": impl, "tokens_per_s": 1.0}

    monkeypatch.setattr(tt, "time_impl", fake_time_impl)
    args = tt.argparse.Namespace(profile="", profile_dir="unused", steps=1, warmup=1, clip="kernel", compile_mode="default")
    before = inductor_config.triton.persistent_reductions
    row = tt.run_variant("mgqa_compiled_sdpa", "125m", args, None, {"triton.persistent_reductions": not before})
    assert row == {"impl": "mgqa_compiled_sdpa", "tokens_per_s": 1.0}
    failed = tt.run_variant("mgqa_compiled_triton", "1b", args, None, {})
    assert failed == {"impl": "mgqa_compiled_triton", "error": "RuntimeError: out of resources"}
    assert seen == [("mgqa_compiled_sdpa", not before), ("mgqa_compiled_triton", before)]
    assert inductor_config.triton.persistent_reductions == before  # the patch ends with the variant
