"""Hostile but realistic inputs: each ends in one `error:` line (no traceback, exit code != 0) and leaves
what is on disk as it was; no checkpoint ever holds NaN; one run per directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mgqa.lit.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteStateError,
    find_resume_checkpoint,
    load_checkpoint,
    load_finite_checkpoint,
    nonfinite_tensors,
)
from mgqa.lit.module import NonFiniteLossError
from mgqa.lit.run import train
from mgqa.lit.validate import USER_ERRORS
from mgqa.model import MGQATransformer, ModelConfig
from mgqa.ops import reference_attention
from tests.conftest import ROOT, TINY, compose
from tests.lit.test_training import read_rows

CLI = ("debug=fast", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0")


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *CLI, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def assert_one_error_line(code: int, output: str, fragment: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and fragment in errors[0], (fragment, output[-2000:])


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def tiny_state(value: float = 1.0) -> dict:
    return {"state_dict": {"model.w": torch.full((3,), value)}, "global_step": 1,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}


def existing_run(out: Path) -> Path:
    """A run directory that refused launches must leave as it is."""
    kept = out / "kept"
    (kept / ".hydra").mkdir(parents=True)
    (kept / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=6\n")
    (kept / "checkpoints").mkdir()
    (kept / "checkpoints" / "step000003.ckpt").write_bytes(b"stands for a checkpoint")
    (kept / "metrics.csv").write_text("epoch,step,train/loss\n0,0,5.5\n")
    return kept


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "random.bin").write_bytes(os.urandom(2000))
    (data / "random.txt").write_bytes(b"\xff\xfe" + os.urandom(2000))
    (data / "empty.txt").write_bytes(b"")
    (data / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n')
    (data / "body.jsonl").write_text('{"body": "no text field here"}\n')
    (data / "empty.ckpt").write_bytes(b"")
    return data


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line_before_any_work_and_leave_disk_untouched(tmp_path, bad_files):
    out = tmp_path / "outputs"
    kept = existing_run(out)
    before = snapshot(kept)
    root = f"output_root={out}"
    triton = "model.attn_backend=triton" if not torch.cuda.is_available() else f"data.files={bad_files / 'random.bin'}"
    cases = [
        (("run_name=kept", "trainer.max_steps=-5"), "trainer.max_steps must be a positive integer"),
        (("run_name=kept", f"data.files={bad_files / 'rows.jsonl'}"), "rows.jsonl line 3 is not valid JSON"),
        (("ckpt_path=last",), "ckpt_path=last needs run_name=NAME"),
        (("run_name=new", triton), "model.attn_backend=triton needs a CUDA GPU" if "triton" in triton else "random.bin"),
    ]
    running = [(launch(root, *args), fragment) for args, fragment in cases]  # each a start-up, then a refusal
    for proc, fragment in running:
        code, output = finish(proc)
        assert_one_error_line(code, output, fragment)
        if fragment.startswith("ckpt_path=last"):
            assert "run_name=kept ckpt_path=last" in output  # names the run to resume
    assert snapshot(kept) == before
    assert sorted(p.name for p in out.iterdir()) == ["kept"]  # no directory left by a refused launch


@pytest.mark.slow
def test_a_mistyped_key_or_option_is_one_line_naming_what_exists(tmp_path):
    # Hydra's own report of these is several lines; each entry script names the override and the
    # closest key, or the group's options, before any work.
    out = f"output_root={tmp_path / 'outputs'}"
    cases = [
        (("train.py", out, "model.kv_head=2"), "train.py: model.kv_head is not an option: did you mean model.kv_heads?"),
        (("train.py", out, "-m", "model.kv_heads=1,2", "trainer.max_step=3"),
         "train.py: trainer.max_step is not an option: did you mean trainer.max_steps?"),
        (("train.py", out, "model=gqa_1b"), "train.py: model=gqa_1b: no such option; choose from gqa_125m, gqa_350m, llama, seed"),
        (("train.py", out, "~sample.nope"), "train.py: ~sample.nope: there is no sample.nope to remove"),
        (("train.py", out, "model.dim==3"), "train.py: cannot parse 'model.dim==3': extraneous input '='"),
        (("generate.py", "max_new_token=5"), "generate.py: max_new_token is not an option: did you mean max_new_tokens?"),
        (("evaluate.py", "data=shakespear"), "evaluate.py: data=shakespear: no such option; choose from"),
        (("export.py", "out_dirr=x"), "export.py: out_dirr is not an option: did you mean out_dir?"),
    ]
    running = [(subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE), fragment) for args, fragment in cases]
    for proc, fragment in running:
        code, output = finish(proc)
        assert_one_error_line(code, output, fragment)
        assert "HYDRA_FULL_ERROR" not in output
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.optimizer.lr=-1", "optim.optimizer.lr must be a positive number, got -1"),
        ("+optim.lr=0.1", "optim.lr is not an option: optim takes optimizer and scheduler; did you mean optim.optimizer.lr?"),
        ("optim.optimizer.betas=[0.9,1.5]", "optim.optimizer.betas must be two numbers in [0, 1)"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval must be a positive integer"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is unknown"),
        ("nonfinite_loss.action=ignore", "nonfinite_loss.action must be one of ['stop', 'skip']"),
        ("sample.top_k=0", "sample.top_k must be a positive integer or null"),
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("+data.batchsize=3", "unexpected keyword argument 'batchsize'"),
        ("data.files=FILES/random.bin", "random.bin' has an unknown extension"),
        ("data.files=FILES/random.txt", "random.txt is not UTF-8 text"),
        ("data.files=FILES/empty.txt", "empty.txt is empty"),
        ("data.files=FILES/body.jsonl", "body.jsonl line 1 has no text field 'text' (its fields: ['body'])"),
        ("ckpt_path=FILES/empty.ckpt", "empty.ckpt is empty (0 bytes)"),
        ("model.attn_backend=triton", "model.attn_backend=triton needs a CUDA GPU"),
    ],
)
def test_bad_values_are_refused_by_train_before_it_writes(tmp_path, bad_files, override, fragment):
    if "triton" in override and torch.cuda.is_available():
        pytest.skip("this machine can run the Triton backend")
    out = tmp_path / "outputs"
    kept = existing_run(out)
    before = snapshot(kept)
    for run_dir in (kept, out / "new"):
        with pytest.raises(USER_ERRORS) as err:
            train(compose(*TINY, f"run_dir={run_dir}", override.replace("FILES", str(bad_files))))
        assert fragment in str(err.value)
    assert snapshot(kept) == before and not (out / "new").exists()


@pytest.mark.slow
def test_two_launches_on_one_run_directory_the_second_is_refused(tmp_path):
    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(f"{dead.pid} somehost 2026-01-01T00:00:00\n")  # left by a killed run
    args = (f"output_root={tmp_path}", "run_name=shared")
    first = launch(*args, "trainer.max_steps=100000")  # runs until SIGTERM
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "metrics.csv").exists():  # after the lock and record
            time.sleep(0.1)
        assert (run_dir / ".lock").read_text().startswith(f"{first.pid} ")
        record = (run_dir / ".hydra" / "overrides.yaml").read_text()
        code, output = finish(launch(*args, "ckpt_path=last", "model.dim=32"))
        assert first.poll() is None, "the first run must still hold the directory"
        assert_one_error_line(code, output, f"run directory {run_dir} is in use by pid {first.pid} on host")
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record  # the refused launch wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)  # save last.ckpt and stop
    code, output = finish(first)
    assert code == 0, output[-3000:]
    assert f"stale lock of pid {dead.pid} on host somehost" in output
    assert (run_dir / ".lock").read_text() == ""  # released at the end
    rows = read_rows(run_dir / "metrics.csv")
    stop = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(stop))  # one writer, each step once
    # The best checkpoint includes the validation on stop: its step is that of the lowest val/loss
    # (metrics.csv logs a validation at the step of the batch before it: global step - 1).
    val = {int(r["step"]) + 1: float(r["val/loss"]) for r in rows if r["val/loss"]}
    assert max(val) == stop
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-step{min(val, key=val.get)}.ckpt"


def test_a_diverging_run_leaves_only_finite_checkpoints(tmp_path):
    # lr=1e4: a finite loss gives an update that makes the weights non-finite; the NaN loss comes a step later.
    short = (*TINY, "sample.max_new_tokens=0", "optim.optimizer.lr=1e4", "callbacks.latest_checkpoint.every_n_train_steps=1",
             "callbacks.latest_checkpoint.save_top_k=-1")
    # The fused optimizer (the default) skips the step whose gradient is already NaN, before the
    # weights are touched; the unfused one applies it and the weight check stops the run.
    for action, fused, message in [("stop", "null", "gradient norm is nan"), ("skip", "null", "gradient norm is nan"),
                                   ("stop", "false", "left NaN or infinity in the weights")]:
        run_dir = tmp_path / (action if fused == "null" else f"{action}_unfused")
        with pytest.raises(NonFiniteLossError, match=message):
            train(compose(*short, f"run_dir={run_dir}", f"nonfinite_loss.action={action}", "nonfinite_loss.max_skips=1",
                          f"optim.optimizer.fused={fused}"))
        saved = sorted((run_dir / "checkpoints").glob("*.ckpt"))
        assert saved, "the steps before the divergence were saved"
        for path in saved:
            assert nonfinite_tensors(load_checkpoint(path)) == [], path
        path, state = find_resume_checkpoint(run_dir)  # what ckpt_path=last resumes
        assert nonfinite_tensors(state) == []
    # The advice of the error works: resume the stopped run from a step before the divergence at a lower
    # learning rate, and it finishes.
    run_dir = tmp_path / "stop"
    earliest = sorted((run_dir / "checkpoints").glob("step*.ckpt"))[0]
    steps = load_checkpoint(earliest)["global_step"] + 2
    val_loss = train(compose(*short, f"run_dir={run_dir}", f"ckpt_path={earliest}", "optim.optimizer.lr=1e-3",
                             f"trainer.max_steps={steps}"))
    assert val_loss == val_loss and val_loss < 10
    lrs = [float(r["train/lr"]) for r in read_rows(run_dir / "metrics.csv") if r["train/lr"]]
    assert lrs[-1] <= 1e-3 * 1.0001  # the configured learning rate (logged in float32), not the checkpoint's 1e4


def test_checkpoint_io_refuses_to_write_a_nonfinite_state(tmp_path):
    target = tmp_path / "step.ckpt"
    with pytest.raises(NonFiniteStateError, match="refusing to write .*step.ckpt.*model.w"):
        AtomicCheckpointIO().save_checkpoint(tiny_state(float("nan")), target)
    bad_moment = tiny_state()
    bad_moment["optimizer_states"][0]["state"][0]["exp_avg"][1] = float("inf")
    with pytest.raises(NonFiniteStateError, match="exp_avg"):
        AtomicCheckpointIO().save_checkpoint(bad_moment, target)
    assert list(tmp_path.iterdir()) == []


def test_every_damaged_checkpoint_is_skipped_by_last_and_named_when_given(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save(tiny_state(), ckpts / "step000001.ckpt")
    damaged = {
        "empty.ckpt": b"",
        "truncated.ckpt": (ckpts / "step000001.ckpt").read_bytes()[:200],
        "garbage.ckpt": os.urandom(500),
    }
    for offset, (name, content) in enumerate(damaged.items(), 1):
        (ckpts / name).write_bytes(content)
        os.utime(ckpts / name, (time.time() + offset, time.time() + offset))  # newer than the good one
    torch.save(tiny_state(float("nan")), ckpts / "nan.ckpt")
    (ckpts / "directory.ckpt").mkdir()
    for name in ("nan.ckpt", "directory.ckpt"):
        os.utime(ckpts / name, (time.time() + 10, time.time() + 10))
    with caplog.at_level("WARNING", logger="mgqa"):
        path, _ = find_resume_checkpoint(tmp_path)
    assert path.name == "step000001.ckpt"
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in (*damaged, "nan.ckpt", "directory.ckpt"):
        assert name in warned
        with pytest.raises(CheckpointError, match=name):
            load_finite_checkpoint(ckpts / name)


def test_python_api_names_a_bad_token_id_and_the_reference_backend_keeps_nan():
    model = MGQATransformer.from_config(ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, num_tokens=50, max_seq_len=16))
    with pytest.raises(ValueError, match=r"token id 50 is out of range: ids must be in \[0, num_tokens=50\)"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    q[0, 1, 3, 0] = float("nan")  # one query row of head 1
    rows = reference_attention(q, k, v, causal=True).isnan().any(-1)  # (B, H, Nq)
    assert rows.nonzero().tolist() == [[0, 1, 3]]
    q[0, 1, 3, 0] = 0.0
    k[0, 0, 2, 0] = float("nan")  # key 2 of KV head 0: read by query heads 0-1, from query 2 on (causal)
    rows = reference_attention(q, k, v, causal=True).isnan().any(-1)
    assert rows.nonzero().tolist() == [[0, h, i] for h in (0, 1) for i in range(2, 6)]
    assert reference_attention(q, k, v, causal=False)[:, :2].isnan().all()
    assert not reference_attention(q, k, v, causal=False)[:, 2:].isnan().any()
    with pytest.raises(ValueError, match="same dtype, got query torch.float64, key torch.float32"):
        reference_attention(q.double(), k, v, causal=True)


def test_a_corpus_shorter_than_one_batch_per_reader_leaves_no_run_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text("a few words only.\n")
    run_dir = tmp_path / "outputs" / "short"
    with pytest.raises(USER_ERRORS) as err:
        train(compose(*TINY, f"run_dir={run_dir}", f"data.files={corpus}/*.txt"))
    assert "fewer than one batch" in str(err.value)
    assert not run_dir.exists()
