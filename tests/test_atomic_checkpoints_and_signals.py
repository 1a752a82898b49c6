"""Runs survive being stopped: ``python main.py fit`` killed with SIGKILL during a save, or stopped with SIGTERM /
SIGINT, leaves a checkpoint that loads and resumes exactly (``minimind_pl.files``, ``checkpoint_io``, ``callbacks.StopOnSignal``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import Dataset

from helpers import REPO, require, tiny_run
from minimind_pl.callbacks import StopOnSignal
from minimind_pl.checkpoint_io import AtomicCheckpointIO, with_atomic_checkpoints
from minimind_pl.files import TEMP_MARK
from minimind_pl.cli import run_lightning
from minimind_pl.data.loader import make_train_loader
from minimind_pl.errors import TrainingStopped

PROCESS_TIMEOUT = 240  # seconds any one `python main.py` may take here (2 shared CPU cores)


# ------------------------------------------------------------------------------------------------ helpers
def default_stop_signals() -> None:
    """In the child: SIGINT/SIGTERM as in a terminal. A test suite started in the background by a shell without
    job control inherits SIGINT ignored, and a Python child would then never see Ctrl+C."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def training_process(args: list[str], stderr: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """``python main.py <args>`` in a process group of its own (its DataLoader workers, DDP ranks), stderr to a
    file (a pipe nobody reads would fill up and block it); the group is killed when the test leaves."""
    with open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=err, env=env, start_new_session=True, preexec_fn=default_stop_signals)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> bool:
    """Poll ``condition`` until it holds (True) or ``process`` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError(f"nothing happened in {timeout}s")


def run_to_end(args: list[str], stderr: Path, env: dict | None = None) -> int:
    """Run ``python main.py <args>`` to its end; its exit status."""
    with training_process(args, stderr, env) as process:
        return process.wait(timeout=PROCESS_TIMEOUT)


def group_gone(pgid: int) -> bool:
    """Whether no process of the group is left (DataLoader workers, DDP ranks, tokenizer processes)."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def load(path: Path) -> dict:
    """A checkpoint as every tool reads it (plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path, context: str = "") -> None:
    """Bit-identical weights; a failure names the tensors that differ and ``context`` (how the run was stopped)."""
    weights_a, weights_b = load(a)["state_dict"], load(b)["state_dict"]
    assert weights_a.keys() == weights_b.keys()
    differ = [name for name, value in weights_a.items() if not torch.equal(value, weights_b[name])]
    assert not differ, f"{len(differ)} of {len(weights_a)} tensors differ, e.g. {differ[:3]}; {context}"


def loader_position(checkpoint: dict) -> dict:
    """The training loader's recorded position (``data.loader.ResumableDataLoader.state_dict``)."""
    return checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def pretrain(tmp_path: Path, shared_dir: Path, cache: Path, steps: int, extra=()) -> list[str]:
    """A tiny pretraining run (``test_cli.tiny_run``) whose token cache is shared by the runs of a test."""
    extra = [*extra, "--data.cache_dir", str(cache)]
    return tiny_run(tmp_path, shared_dir, "pretrain", "pretrain_real.jsonl", steps, extra)


# ----------------------------------------------------------------------------------------- atomic writes
def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")  # fails after the tensors before it were written

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"weights": torch.zeros(100_000), "broken": Unpicklable()}, path)
    assert load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    io.remove_checkpoint(path)
    assert not path.exists()


def test_a_save_removes_the_temporary_files_of_killed_saves_only(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, host = int(finished.stdout), os.getppid(), socket.gethostname()
    killed = tmp_path / f"last.ckpt{TEMP_MARK}{host}-{dead}-0123abcd"
    running = tmp_path / f"last.ckpt{TEMP_MARK}{host}-{alive}-0123abcd"
    elsewhere = tmp_path / f"last.ckpt{TEMP_MARK}other-host-{dead}-0123abcd"
    for path in (killed, running, elsewhere):
        path.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "epoch=0-step=2.ckpt")
    assert not killed.exists()  # its writer is gone
    assert running.exists() and elsewhere.exists()  # a live writer, or one this host cannot check


def test_the_cli_writes_checkpoints_atomically_unless_the_config_names_a_checkpoint_io():
    assert any(isinstance(p, AtomicCheckpointIO) for p in with_atomic_checkpoints({"plugins": None})["plugins"])
    assert with_atomic_checkpoints({"plugins": "bf16-mixed"})["plugins"][0] == "bf16-mixed"
    own = {"plugins": [TorchCheckpointIO()]}
    assert with_atomic_checkpoints(own) is own


def test_sigkill_during_a_save_leaves_a_loadable_last_ckpt_and_nothing_in_tmpdir(tmp_path, shared_dir):
    """``kill -9`` while last.ckpt is being rewritten, with $TMPDIR on another filesystem (tmpfs)."""
    shm = Path("/dev/shm")
    require(shm.is_dir(), "/dev/shm (a tmpfs, another filesystem than tmp_path) is missing")
    tmpdir = shm / f"minimind-test-{uuid.uuid4().hex[:8]}"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    folder, last = tmp_path / "ckpt", tmp_path / "ckpt" / "last.ckpt"

    def run_args(steps: int, extra=()) -> list[str]:
        """A model with large checkpoints (350 MB) and quick steps, saving at every step."""
        bigger = ["--model.config.hidden_size", "512", "--model.config.num_hidden_layers", "8",
                  "--data.batch_size", "1", "--data.seq_len", "16", *extra]
        args = pretrain(tmp_path, shared_dir, tmp_path / "cache", steps, bigger)
        i = args.index("--trainer.callbacks") + 1
        args[i] = args[i].replace('"every_n_train_steps": 2', '"every_n_train_steps": 1')
        return args

    def rewriting_last() -> bool:
        writing = any(tmpdir.iterdir()) or any(p.name.startswith(last.name + TEMP_MARK) for p in folder.iterdir())
        return last.exists() and writing

    try:
        for attempt in range(3):  # the kill must land while last.ckpt is rewritten; retry if the poll missed it
            with training_process(run_args(200), tmp_path / f"killed-{attempt}.txt", env) as process:
                caught = wait_until(lambda: folder.is_dir() and rewriting_last(), process)
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            if caught:
                break
        assert caught, "never caught a save in progress"
        assert list(tmpdir.iterdir()) == [], "a killed save left files in $TMPDIR"
        for checkpoint in folder.glob("*.ckpt"):
            load(checkpoint)  # every *.ckpt is complete; what the kill interrupted has another name
        step = load(last)["global_step"]
        stderr = tmp_path / "resumed.txt"
        assert run_to_end(run_args(step + 1, ["--ckpt_path", str(last)]), stderr, env) == 0, stderr.read_text()[-3000:]
        assert load(last)["global_step"] == step + 1
        assert [p.name for p in folder.iterdir() if TEMP_MARK in p.name] == []  # the next save removed the leftover
        assert list(tmpdir.iterdir()) == []
    finally:
        for path in tmpdir.iterdir():
            path.unlink()
        tmpdir.rmdir()


# ------------------------------------------------------------------------------------------- stop signals
STEPS = 24  # of the runs below; a stop lands a few steps after step 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_dir) -> tuple[Path, Path]:
    """The token cache for the runs of this module, and last.ckpt of a run nobody stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    stderr = root / "stderr.txt"
    assert run_to_end(pretrain(root, shared_dir, root / "cache", STEPS), stderr) == 0, stderr.read_text()[-3000:]
    return root / "cache", root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("signum, send, extra", [
    (signal.SIGTERM, os.kill, []),  # as a scheduler or `kill` does: the training process
    # as Ctrl+C does: every process of the group, DataLoader workers too; without a sanity check (as in a resumed
    # run) the workers start before StopOnSignal takes the signals over
    (signal.SIGINT, os.killpg, ["--data.num_workers", "2", "--trainer.num_sanity_val_steps", "0"]),
], ids=["SIGTERM", "SIGINT-with-workers"])
def test_a_stop_signal_saves_the_step_and_the_resumed_run_ends_with_the_same_weights(
        tmp_path, shared_dir, uninterrupted, signum, send, extra):
    cache, straight = uninterrupted
    last, stderr = tmp_path / "ckpt" / "last.ckpt", tmp_path / "stopped.txt"
    with training_process(pretrain(tmp_path, shared_dir, cache, STEPS, extra), stderr) as process:
        assert wait_until(lambda: (tmp_path / "ckpt" / "epoch=0-step=4.ckpt").exists(), process)
        send(process.pid, signum)
        assert process.wait(timeout=PROCESS_TIMEOUT) == 128 + signum, stderr.read_text()[-3000:]
        assert group_gone(process.pid), "a DataLoader worker is still running"
    assert f"--ckpt_path {last}" in stderr.read_text()
    saved = load(last)
    assert 4 <= saved["global_step"] < STEPS and saved["epoch"] == 0
    position = loader_position(saved)
    assert position["batches_done"] == saved["global_step"] < position["num_rows"] // position["batch_size"]

    resumed = pretrain(tmp_path, shared_dir, cache, STEPS, ["--ckpt_path", str(last)])
    assert run_to_end(resumed, tmp_path / "resumed.txt") == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    assert load(last)["global_step"] == STEPS
    stopped_log = [line for line in stderr.read_text().splitlines() if "received" in line]
    assert_same_weights(straight, last, f"stopped at step {saved['global_step']} ({stopped_log}), "
                                        f"loader position {position}")


def test_every_ddp_rank_stops_after_the_same_step_when_one_rank_gets_sigterm(tmp_path, shared_dir, uninterrupted):
    cache, _ = uninterrupted
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]  # two CPU processes (gloo)
    stderr = tmp_path / "stopped.txt"
    with training_process(pretrain(tmp_path, shared_dir, cache, 100, ddp), stderr) as process:
        assert wait_until(lambda: (tmp_path / "ckpt" / "epoch=0-step=4.ckpt").exists(), process)
        os.kill(process.pid, signal.SIGTERM)  # rank 0 only; rank 1 learns it at the next optimizer step
        assert process.wait(timeout=PROCESS_TIMEOUT) == 143, stderr.read_text()[-3000:]
        assert group_gone(process.pid), "a rank is still running"
    messages = [line for line in stderr.read_text().splitlines() if line.startswith("error: SIGTERM received")]
    assert len(messages) == 2 and messages[0] == messages[1], messages  # both ranks, the same step
    saved = load(tmp_path / "ckpt" / "last.ckpt")
    assert f"optimizer step {saved['global_step']} " in messages[0]
    assert loader_position(saved)["batches_done"] == saved["global_step"]


class SendSignal(Callback):
    """Send this process ``signum`` ``times`` times when micro-batch ``batch_idx`` starts (a deterministic moment)."""

    def __init__(self, batch_idx: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.batch_idx, self.signum, self.times = batch_idx, signum, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                time.sleep(0.01)  # Python runs the handler between these calls


def test_with_gradient_accumulation_the_stop_waits_for_the_optimizer_step(tmp_path, shared_dir):
    accumulate = ["--trainer.accumulate_grad_batches", "2"]
    straight = run_lightning(pretrain(tmp_path / "a", shared_dir, tmp_path / "cache", 8, accumulate))
    assert isinstance(straight.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, StopOnSignal) for c in straight.trainer.callbacks)
    stopped_args = pretrain(tmp_path / "b", shared_dir, tmp_path / "cache", 8, accumulate)
    with pytest.raises(TrainingStopped) as stopped:
        run_lightning(stopped_args, extra_callbacks=[SendSignal(batch_idx=6)])  # 1st micro-batch of step 4
    assert stopped.value.exit_code == 143
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = load(last)
    assert saved["global_step"] == 4 and loader_position(saved)["batches_done"] == 8  # the whole step 4
    resumed = run_lightning(pretrain(tmp_path / "b", shared_dir, tmp_path / "cache", 8,
                                     [*accumulate, "--ckpt_path", str(last)]))
    assert resumed.trainer.global_step == 8
    assert_same_weights(tmp_path / "a" / "ckpt" / "last.ckpt", last)


def test_a_second_signal_stops_at_once_without_saving(tmp_path, shared_dir):
    args = pretrain(tmp_path, shared_dir, tmp_path / "cache", 40)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="second time: stopped at once") as stopped:
        run_lightning(args, extra_callbacks=[SendSignal(batch_idx=5, times=2)])
    assert stopped.value.exit_code == 143
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 4  # ModelCheckpoint's, not step 5 or 6
    assert signal.getsignal(signal.SIGTERM) == handler  # the handlers are given back


class WorkerPids(Dataset):
    """Rows that say which process loaded them."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> int:
        return os.getpid()


def test_dataloader_workers_leave_stop_signals_to_the_training_process():
    """A worker killed by Ctrl+C or a scheduler's SIGTERM would end the run before StopOnSignal saves it.

    (Workers forked after StopOnSignal took the signals over inherit its handler; these inherit Python's own,
    as every worker does under the spawn and forkserver start methods.)
    """
    loader = make_train_loader(WorkerPids(), batch_size=2, seed=0, num_workers=1, collate_fn=None)
    batches = iter(loader)
    worker = int(next(batches)[0])
    assert worker != os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker, signum)
    time.sleep(0.5)
    assert {int(pid) for batch in batches for pid in batch} == {worker}  # the same worker loaded the rest
    del batches, loader


def test_ctrl_c_while_tokenizing_exits_nonzero_and_leaves_no_process(tmp_path, shared_dir):
    big = tmp_path / "big.jsonl"  # large enough for the parallel tokenizer
    big.write_bytes((shared_dir / "corpus" / "pretrain_real.jsonl").read_bytes() * 10)
    args = pretrain(tmp_path, shared_dir, tmp_path / "cache", 40, ["--data.num_proc", "2"])
    args[args.index("--data.train_path") + 1] = str(big)
    stderr = tmp_path / "stderr.txt"
    with training_process(args, stderr) as process:
        assert wait_until(lambda: "tokenizing big.jsonl:" in stderr.read_text(), process)
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl+C does: every process of the terminal's group
        assert process.wait(timeout=60) != 0
        assert group_gone(process.pid), "a tokenizer process is still running"
    assert not list((tmp_path / "cache").glob("*.cache")), "no cache counts as built"
