"""bench/kernel_bandwidth.py reads Inductor's per-kernel profile (its command line: test_cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch._inductor.runtime.runtime_utils import create_bandwidth_info_str

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import kernel_bandwidth as kb  # noqa: E402


def section(calls: list[tuple[float, float, str]]) -> str:
    """One graph call's block as Inductor writes it (triton_heuristics.end_graph), from torch's own formatter."""
    total = sum(ms for ms, _, _ in calls)
    lines = ["====================", "TRITON KERNELS BANDWIDTH INFO (/tmp/graph.py)"]
    for ms, gb, name in sorted(calls, reverse=True):
        suffix = f" \t {ms / total * 100:.2f}% \t {name}"
        lines.append(create_bandwidth_info_str(ms, gb, gb / (ms / 1e3), suffix=suffix, color=False))
    lines.append(f"SUMMARY (/tmp/graph.py)\n{total:.2f}ms   \t {sum(gb for _, gb, _ in calls):.2f} GB\t 1.00GB/s\n")
    return "\n".join(lines)


def test_kernels_are_summed_over_calls_and_steps_most_time_first():
    # Two steps, each calling the norm kernel twice (two blocks) and the rotary kernel once.
    step = section([(0.100, 0.200, "triton_red_fused_norm_0"), (0.100, 0.200, "triton_red_fused_norm_0"),
                    (0.300, 0.150, "triton_poi_fused_rotary_1")])
    rows = kb.parse_profile(step + "\n" + step, steps=2, bandwidth_gbps=3350.0)
    assert [r["kernel"] for r in rows] == ["triton_poi_fused_rotary_1", "triton_red_fused_norm_0"]
    rotary, norm = rows
    assert rotary["calls_per_step"] == 1 and norm["calls_per_step"] == 2
    assert rotary["ms_per_step"] == pytest.approx(0.300) and norm["ms_per_step"] == pytest.approx(0.200)
    assert norm["gb_per_step"] == pytest.approx(0.400)
    assert norm["gb_per_s"] == pytest.approx(2000.0) and rotary["gb_per_s"] == pytest.approx(500.0)
    assert norm["bandwidth_share"] == pytest.approx(2000.0 / 3350.0)
    text = kb.table(rows, top=1)
    assert "`triton_poi_fused_rotary_1`" in text and "`triton_red_fused_norm_0`" not in text
    assert "| all 2 kernels | | 0.500 | 100% | 0.550 |" in text


def test_without_a_bandwidth_there_is_no_share():
    rows = kb.parse_profile(section([(0.1, 0.1, "triton_poi_fused_add_0")]), steps=1)
    assert "bandwidth_share" not in rows[0]
    assert "| - |" in kb.table(rows, top=5)


def generated_module(kernels: dict[str, str], detailed: bool) -> str:
    """A graph's generated module holding these Triton kernels, written as Inductor writes them
    (TritonScheduling.define_kernel into PythonWrapperCodegen._format_kernel_definition)."""
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    from torch._inductor.utils import IndentedBuffer

    text = "from torch._inductor.async_compile import AsyncCompile\nasync_compile = AsyncCompile()\n"
    for name, source in kernels.items():
        body = IndentedBuffer()
        body.writeline(f"async_compile.triton({name!r}, '''")
        body.splice(source, strip=True)
        body.writeline("''', device_str='cuda')")
        metadata = (f"# kernel path: /tmp/cache/xy/{name}.py\n"
                    "# Topologically Sorted Source Nodes: [rms_norm], Original ATen: [aten.mul]")
        metadata += "\n# Source node to ATen node mapping:\n#   rms_norm => mul\n" if detailed else "\n"
        text += PythonWrapperCodegen._format_kernel_definition(name, body.getvalue(), metadata)
    return text + "\n\nasync_compile.wait(globals())\n"


def test_kernel_sources_are_read_from_generated_modules_with_their_origin_comment(tmp_path):
    norm = "import triton\n\n@triton.jit\ndef triton_per_fused_norm_6(in_ptr0, out_ptr0):\n    x = tl.load(in_ptr0)\n"
    rotary = "import triton\n\n@triton.jit\ndef triton_poi_fused_rotary_5(in_ptr0):\n    pass\n"
    first = generated_module({"triton_per_fused_norm_6": norm}, detailed=True)
    second = generated_module({"triton_poi_fused_rotary_5": rotary, "triton_poi_fused_add_9": rotary}, detailed=False)

    sources = kb.kernel_sources(first + second)
    assert list(sources) == ["triton_per_fused_norm_6", "triton_poi_fused_rotary_5", "triton_poi_fused_add_9"]
    assert sources["triton_per_fused_norm_6"].startswith("# kernel path: /tmp/cache/xy/triton_per_fused_norm_6.py\n")
    assert "#   rms_norm => mul\n" in sources["triton_per_fused_norm_6"]
    assert sources["triton_per_fused_norm_6"].endswith(norm.strip() + "\n")
    assert "def triton_poi_fused_rotary_5(in_ptr0)" in sources["triton_poi_fused_rotary_5"]
    assert "async_compile" not in "".join(sources.values())

    cache = tmp_path / "inductor"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "graph_fwd.py").write_text(first)
    (cache / "cd" / "ef").mkdir(parents=True)
    (cache / "cd" / "ef" / "graph_bwd.py").write_text(second)
    (cache / "ab" / "kernel_alone.py").write_text(norm)  # a kernel's own file holds no definition line
    wanted = ["triton_poi_fused_rotary_5", "triton_per_fused_norm_6", "triton_red_fused_missing_0"]
    written = kb.write_sources(cache, wanted, tmp_path / "code")
    assert written == ["triton_poi_fused_rotary_5", "triton_per_fused_norm_6"]
    files = sorted(p.name for p in (tmp_path / "code").iterdir())
    assert files == ["triton_per_fused_norm_6.py", "triton_poi_fused_rotary_5.py"]
    assert (tmp_path / "code" / "triton_per_fused_norm_6.py").read_text() == sources["triton_per_fused_norm_6"]


def _in_place_kernel_tuner():
    """torch's CachingAutotuner, set up as for a CPU kernel whose first argument it writes in place;
    and the launcher it times, which records the buffer it was given."""
    import types

    import torch
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    tuner = object.__new__(CachingAutotuner)
    tuner.custom_kernel, tuner.inductor_meta, tuner.optimize_mem = False, {}, False
    tuner.device_props = types.SimpleNamespace(type="cpu")
    tuner.mutated_arg_names, tuner.reset_to_zero_arg_names = ["buf"], []
    tuner.fn = types.SimpleNamespace(arg_names=["buf", "x"])
    tuner.benchmark_failure_reasons = {}
    given = []

    def launcher(buf, x, stream=None):
        given.append(buf)
        buf.add_(x)

    launcher.n_spills, launcher.config = None, None
    return tuner, launcher, given, torch.zeros(64), torch.ones(64)


def test_in_place_arguments_are_copied_once_before_timing_and_the_step_keeps_its_values():
    tuner, launcher, given, buf, x = _in_place_kernel_tuner()
    tuner.bench(launcher, buf, x)
    assert len(given) > 1 and given[0] is not given[1]  # torch's own: a fresh copy inside every timed call
    given.clear()
    with kb.clones_outside_timing():
        tuner.bench(launcher, buf, x)
    assert len(given) > 1 and all(b is given[0] for b in given) and given[0] is not buf
    assert not buf.any()  # the step's buffer is never written by the benchmark
    assert "maybe_clone_args" not in vars(tuner)  # the patch ends with the benchmark
    tuner.bench(launcher, buf, x)
    assert given[-1] is not given[0]
