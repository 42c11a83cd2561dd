"""The fused optimizer's step: clipping and the non-finite check inside its kernel, read one step later."""

import re

import pytest
import torch

from mgqa.lit.checkpoint import load_checkpoint, nonfinite_tensors
from mgqa.lit.module import LanguageModel, NonFiniteLossError
from mgqa.lit.run import train
from tests.conftest import TINY, compose
from tests.lit.test_training import read_rows

RUN = (*TINY, "sample.max_new_tokens=0", "trainer.max_steps=8", "optim.optimizer.lr=1e-2")


def _losses(run_dir):
    return {int(r["step"]): float(r["train/loss"]) for r in read_rows(run_dir / "metrics.csv") if r["train/loss"]}


def test_clipping_inside_the_fused_step_matches_clip_grad_norm(tmp_path, monkeypatch):
    decided = []
    real = LanguageModel.on_train_start

    def record(self):
        real(self)
        decided.append(self._verdict_on_device)

    monkeypatch.setattr(LanguageModel, "on_train_start", record)
    # A low threshold, so that every step is clipped and the clipping decides the updates.
    fused, plain = tmp_path / "fused", tmp_path / "plain"
    train(compose(*RUN, f"run_dir={fused}", "trainer.gradient_clip_val=0.05"))
    train(compose(*RUN, f"run_dir={plain}", "trainer.gradient_clip_val=0.05", "optim.optimizer.fused=false"))
    assert decided == [True, False]
    rows = [r for r in read_rows(fused / "metrics.csv") if r["train/loss"]]
    norms = [float(r["train/grad_norm"]) for r in rows]
    assert len(norms) == 8 and all(n > 0.05 for n in norms)  # clipped at every step
    ours, reference = _losses(fused), _losses(plain)
    assert ours.keys() == reference.keys()
    assert ours == pytest.approx(reference, rel=1e-4)
    unclipped = tmp_path / "unclipped"
    train(compose(*RUN, f"run_dir={unclipped}", "trainer.gradient_clip_val=0"))
    assert _losses(unclipped)[7] != pytest.approx(ours[7], rel=1e-4)  # the clipping changed the run


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path, monkeypatch):
    # The loss is NaN at step 2 only: its update is skipped inside the kernel, so the run after it
    # is the run of the same batches with step 2's batch left out of the weights and the moments.
    real = LanguageModel._loss
    states = {}

    def loss(self, batch):
        value = real(self, batch)
        if self.training and self.global_step in (2, 3):
            states[self.global_step] = {k: v.clone() for k, v in self.model.state_dict().items()}
            opt = self.trainer.optimizers[0]
            states[(self.global_step, "step")] = [s["step"].clone() for s in opt.state.values()]
        return value * float("nan") if self.training and self.global_step == 2 else value

    monkeypatch.setattr(LanguageModel, "_loss", loss)
    train(compose(*RUN, f"run_dir={tmp_path}", "nonfinite_loss.action=skip"))
    for name, before in states[2].items():
        assert torch.equal(before, states[3][name]), name
    assert states[(2, "step")] == states[(3, "step")]
    rows = [r for r in read_rows(tmp_path / "metrics.csv") if r["train/loss"]]
    assert [r["train/skipped_batches"] for r in rows] == ["0.0", "0.0", "1.0", "1.0", "1.0", "1.0", "1.0", "1.0"]
    assert rows[2]["train/grad_norm"] == "nan"


def test_the_progress_bar_shows_the_training_loss(tmp_path, capfd):
    # train/loss is logged without prog_bar (which would read it after every batch); the bar reads it itself.
    train(compose("debug=fast", "sample.max_new_tokens=0", f"run_dir={tmp_path}", "trainer.log_every_n_steps=2"))
    err = capfd.readouterr().out  # Lightning draws its bar on standard output
    shown = [float(value) for value in re.findall(r"train/loss=([0-9.]+)", err)]
    assert shown and all(0 < value < 10 for value in shown)


class _CopyInFlight:
    """Stands in for the CUDA event after a verdict's copy to the host: records when it is waited for."""

    def __init__(self, events: list, step: int) -> None:
        self.events, self.step = events, step

    def synchronize(self) -> None:
        self.events.append(("wait", self.step))


def _copies_in_flight(monkeypatch):
    """Every verdict's copy is asynchronous, as on a GPU; returns the list of forwards and waits."""
    import mgqa.lit.module as module

    events = []
    real_loss = LanguageModel._loss

    def loss(self, batch):
        if self.training:
            events.append(("forward", self.global_step))
        return real_loss(self, batch)

    def to_host(flags):
        return flags, _CopyInFlight(events, len([e for e in events if e[0] == "forward"]) - 1)

    monkeypatch.setattr(LanguageModel, "_loss", loss)
    monkeypatch.setattr(module, "to_host", to_host)
    return events


def test_the_host_reads_an_asynchronous_verdict_verdict_lag_steps_later(tmp_path, monkeypatch):
    events = _copies_in_flight(monkeypatch)
    train(compose(*RUN, f"run_dir={tmp_path}", "trainer.max_steps=6",
                  "trainer.val_check_interval=6"))  # a checkpoint waits for all
    lag = LanguageModel.verdict_lag
    # Step n's verdict is waited for only once lag + 1 verdicts are pending, at step n + lag + 1.
    queued = [("forward", 0), ("forward", 1), ("forward", 2)]
    for n in range(3, 6):
        queued += [("forward", n), ("wait", n - lag - 1)]
    assert events[: len(queued)] == queued, events
    # The rest is read when training ends (or before a checkpoint), none left unread.
    assert sorted(step for kind, step in events if kind == "wait") == list(range(6))


def test_a_nan_step_read_late_still_stops_the_run_naming_it(tmp_path, monkeypatch):
    events = _copies_in_flight(monkeypatch)
    real = LanguageModel._loss  # the recording one

    def nan_at_two(self, batch):
        value = real(self, batch)
        return value * float("nan") if self.training and self.global_step == 2 else value

    monkeypatch.setattr(LanguageModel, "_loss", nan_at_two)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 2 .*stopping"):
        train(compose(*RUN, f"run_dir={tmp_path}", "trainer.val_check_interval=8"))
    forwards = [step for kind, step in events if kind == "forward"]
    assert max(forwards) == 2 + LanguageModel.verdict_lag + 1  # read once lag + 1 verdicts are pending


@pytest.mark.parametrize("poisoned_update, checkpoint_every, expected_checks, caught_by", [
    (2, 50, [3], "the next step's NaN loss"),
    (2, 1, [1, 2, 3], "the checkpoint after the update"),
    (7, 50, [8], "the checkpoint at the end (the last update)"),
])
def test_weights_an_update_made_nonfinite_stop_the_run_before_any_checkpoint_holds_them(
        tmp_path, monkeypatch, poisoned_update, checkpoint_every, expected_checks, caught_by):
    # An update with a finite loss leaves a NaN in the weights (as a huge learning rate can). No step
    # reads the weights for it: the next loss, each checkpoint and the end of training do.
    real_step, checks = LanguageModel.optimizer_step, []
    real_check = LanguageModel._check_weights

    def poisoning_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        if self.global_step == poisoned_update:  # counted up once this hook returns
            with torch.no_grad():
                self.model.attn_layers.blocks[0].ff.w_out.weight[0, 0] = float("nan")

    def recorded_check(self, step):
        checks.append(step)
        real_check(self, step)

    monkeypatch.setattr(LanguageModel, "optimizer_step", poisoning_step)
    monkeypatch.setattr(LanguageModel, "_check_weights", recorded_check)
    message = rf"an update left NaN or infinity in the weights \(model\.attn_layers\.blocks\.0\.ff\.w_out\.weight\) by step {poisoned_update + 1},"
    with pytest.raises(NonFiniteLossError, match=message):
        train(compose(*RUN, f"run_dir={tmp_path}", "nonfinite_loss.action=skip", "trainer.val_check_interval=8",
                      f"callbacks.latest_checkpoint.every_n_train_steps={checkpoint_every}"))
    # Checked at each checkpoint and at the NaN loss, not after every update.
    assert checks == expected_checks, caught_by
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert bool(saved) == (checkpoint_every == 1)
    for path in saved:
        assert nonfinite_tensors(load_checkpoint(path)) == [], path


def test_a_logging_step_waits_for_nothing_and_its_row_is_written_once_its_verdict_is_read(tmp_path, monkeypatch):
    # On a GPU, Lightning reads every logged device value at a logging step (a wait for the whole
    # queue) and copies a logged Python number to the device (another). A logging step's values
    # travel with its verdict instead, and its row is written when the verdict is read.
    import lightning as L

    events = _copies_in_flight(monkeypatch)
    logged = []
    real_log, real_write = L.LightningModule.log, LanguageModel._write_row

    def log(self, name, value, *args, **kwargs):
        if self.training:
            logged.append(name)
        return real_log(self, name, value, *args, **kwargs)

    def write_row(self, verdict):
        events.append(("row", verdict.step))
        return real_write(self, verdict)

    monkeypatch.setattr(L.LightningModule, "log", log)
    monkeypatch.setattr(LanguageModel, "_write_row", write_row)
    train(compose(*RUN, f"run_dir={tmp_path}", "trainer.max_steps=6", "trainer.log_every_n_steps=2",
                  "trainer.val_check_interval=6", "nonfinite_loss.action=skip"))
    assert logged == []  # nothing logged through Lightning while training
    rows = [e for e in events if e[0] == "row"]
    assert rows == [("row", 1), ("row", 3), ("row", 5)]  # the logging steps, each once
    for row in rows:  # each right after the read of its verdict, at step n + lag + 1 (the last at the end)
        assert events[events.index(row) - 1] == ("wait", row[1])
    train_rows = [r for r in read_rows(tmp_path / "metrics.csv") if r["train/loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 3, 5]
    for r in train_rows:  # one row a step, the rates in it
        for name in ("train/loss", "train/lr", "train/grad_norm", "train/skipped_batches", "train/tokens_per_s"):
            assert float(r[name]) >= 0, (name, r)


class _FakeEvent:
    """A CUDA event on a clock the test moves: records when it is waited for."""

    now = 0.0
    waits: list = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.time = None

    def record(self) -> None:
        self.time = _FakeEvent.now

    def synchronize(self) -> None:
        _FakeEvent.waits.append(self.time)

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.time - self.time) * 1e3  # milliseconds, as CUDA's


def test_the_device_clock_times_training_on_the_gpu_timeline_without_validation():
    from mgqa.lit.callbacks import _TrainingClock

    _FakeEvent.now, _FakeEvent.waits = 10.0, []
    clock = _TrainingClock(_FakeEvent)  # training timed from t = 10
    _FakeEvent.now = 12.0
    first = clock.mark()
    _FakeEvent.now = 13.0
    clock.pause()  # validation from 13 to 15
    _FakeEvent.now = 15.0
    clock.resume()
    _FakeEvent.now = 18.0
    second = clock.mark()
    assert _FakeEvent.waits == []  # marking waits for nothing
    assert clock.seconds(first) == pytest.approx(2.0)
    assert clock.seconds(second) == pytest.approx(6.0)  # 8 s since the start, less 2 s of validation
    assert _FakeEvent.waits == [12.0, 18.0]  # each event when it is read
