"""Kill a training run for real, resume it, and check it ends bit for bit like an uninterrupted one.

Run ``python -m ckptkit.demo``. It trains a small numpy MLP three times, each in a subprocess:
once without interruption (the reference); once until it is SIGKILLed in the middle of an epoch;
and once more on the killed run's store, resuming from its last committed checkpoint. The resumed
run must stop at the same epoch, pick the same best epoch, and end with the same bytes as the
reference. Exit status: 0 when identical, 1 when not, 2 on a usage error. POSIX only (SIGKILL).

The workers talk to the parent by JSON lines on stdout. The kill is synchronised on that pipe:
the worker reports that it is paused mid-epoch and blocks reading stdin, so the kill always lands
at the same point without any sleep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ckptkit import Checkpointer, CheckpointStore, StoppingPolicy

Array = NDArray[np.float64]

SEED = 20240601
N_TRAIN, N_VAL, N_FEATURES, N_HIDDEN = 400, 1000, 30, 32
BATCH, LEARNING_RATE, MOMENTUM, LABEL_NOISE = 20, 0.005, 0.9, 0.15
PATIENCE, MAX_EPOCHS = 5, 200
PARAM_NAMES = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Training and validation split of the synthetic task."""

    x_train: Array
    y_train: Array
    x_val: Array
    y_val: Array


def make_data(seed: int = SEED) -> Dataset:
    """Labels from a random tanh teacher, some flipped, so a small training set gets overfitted."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL
    x = rng.standard_normal((n, N_FEATURES))
    teacher_in = rng.standard_normal((N_FEATURES, 8))
    teacher_out = rng.standard_normal(8)
    y = (np.tanh(x @ teacher_in / np.sqrt(N_FEATURES)) @ teacher_out > 0).astype(np.float64)
    flip = rng.random(n) < LABEL_NOISE
    y[flip] = 1.0 - y[flip]
    return Dataset(x_train=x[:N_TRAIN], y_train=y[:N_TRAIN], x_val=x[N_TRAIN:], y_val=y[N_TRAIN:])


def _plain(value: Any) -> Any:
    """Mappings as plain dicts, recursively: numpy's bit generator setter accepts only a dict."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


class TrainingState:
    """Everything an epoch reads: parameters, momentum buffers and the shuffling generator.

    Leaving any of the three out of the checkpoint would make a resumed run drift from an
    uninterrupted one (the momentum, or the order of the next epoch's minibatches).
    """

    def __init__(self, seed: int = SEED) -> None:
        init = np.random.default_rng(seed + 1)
        self.params: dict[str, Array] = {
            "w1": init.standard_normal((N_FEATURES, N_HIDDEN)) / np.sqrt(N_FEATURES),
            "b1": np.zeros(N_HIDDEN),
            "w2": init.standard_normal((N_HIDDEN, 1)) / np.sqrt(N_HIDDEN),
            "b2": np.zeros(1),
        }
        self.momentum: dict[str, Array] = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.shuffle_rng = np.random.default_rng(seed + 2)

    def state_dict(self) -> dict[str, Any]:
        """The training state as a tree of numpy arrays and JSON values."""
        return {
            "params": dict(self.params),
            "momentum": dict(self.momentum),
            "shuffle_rng": self.shuffle_rng.bit_generator.state,
        }

    def load_state_dict(self, tree: Mapping[str, Any]) -> None:
        """Replace the training state with ``tree``, as returned by :meth:`state_dict`."""
        for group in ("params", "momentum"):
            loaded = {k: np.array(tree[group][k], dtype=np.float64) for k in PARAM_NAMES}
            for name, array in loaded.items():
                if array.shape != self.params[name].shape:
                    raise ValueError(
                        f"{group}/{name} has shape {array.shape}, the demo model needs "
                        f"{self.params[name].shape}: the store was written by another model"
                    )
            setattr(self, group, loaded)
        self.shuffle_rng.bit_generator.state = _plain(tree["shuffle_rng"])

    def _forward(self, x: Array) -> tuple[Array, Array]:
        hidden = np.tanh(x @ self.params["w1"] + self.params["b1"])
        logits = (hidden @ self.params["w2"] + self.params["b2"])[:, 0]
        return hidden, logits

    def train_epoch(self, data: Dataset, on_batch: Callable[[int], None] | None = None) -> None:
        """One epoch of minibatch SGD with momentum on the logistic loss."""
        order = self.shuffle_rng.permutation(N_TRAIN)
        for batch, start in enumerate(range(0, N_TRAIN, BATCH)):
            if on_batch is not None:
                on_batch(batch)
            idx = order[start : start + BATCH]
            x, y = data.x_train[idx], data.y_train[idx]
            hidden, logits = self._forward(x)
            d_logits = (np.exp(-np.logaddexp(0.0, -logits)) - y) / len(idx)
            d_hidden = np.outer(d_logits, self.params["w2"][:, 0]) * (1.0 - hidden**2)
            grads = {
                "w1": x.T @ d_hidden,
                "b1": d_hidden.sum(axis=0),
                "w2": (hidden.T @ d_logits)[:, None],
                "b2": np.array([d_logits.sum()]),
            }
            for name in PARAM_NAMES:
                # New arrays rather than in-place updates: a tree handed to the store never
                # changes under it.
                self.momentum[name] = MOMENTUM * self.momentum[name] + grads[name]
                self.params[name] = self.params[name] - LEARNING_RATE * self.momentum[name]

    def evaluate(self, data: Dataset) -> tuple[float, float]:
        """Validation (loss, accuracy)."""
        _, logits = self._forward(data.x_val)
        loss = np.mean(np.logaddexp(0.0, logits) - data.y_val * logits)
        accuracy = np.mean((logits > 0) == (data.y_val > 0.5))
        return float(loss), float(accuracy)

    def digest(self) -> str:
        """SHA-256 of the parameters' bytes."""
        h = hashlib.sha256()
        for name in PARAM_NAMES:
            h.update(np.ascontiguousarray(self.params[name]).tobytes())
        return h.hexdigest()


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def train(root: Path, *, pause_in_epoch: int | None = None) -> None:
    """Train to the early stop in the store at ``root``, resuming from it if it has checkpoints.

    With ``pause_in_epoch``, half-way through that epoch the worker reports ``paused`` and
    blocks reading a line from stdin: the parent kills it there.
    """
    data = make_data()
    store = CheckpointStore(root, keep_last=2, keep_best=2, monitor="val_loss")
    policy = StoppingPolicy(monitor="val_loss", mode="min", patience=PATIENCE)
    state = TrainingState()
    ckpt = Checkpointer(store, policy, state)
    latest = store.latest()
    start = ckpt.resume()
    _emit("start", restored=None if latest is None else latest.step, next_step=start)

    last = start - 1
    for epoch in range(start, MAX_EPOCHS):
        if policy.should_stop:  # the store holds a run that already stopped
            break

        def pause(batch: int, epoch: int = epoch) -> None:
            if epoch == pause_in_epoch and batch == N_TRAIN // BATCH // 2:
                _emit("paused", step=epoch, batch=batch)
                sys.stdin.readline()

        state.train_epoch(data, pause)
        val_loss, acc = state.evaluate(data)
        decision = ckpt.step(epoch, {"val_loss": val_loss, "acc": acc})
        assert decision is not None  # a checkpointer with a policy always decides
        _emit("committed", step=epoch, val_loss=val_loss, acc=acc, improved=decision.improved)
        last = epoch
    final_digest = state.digest()
    best = ckpt.restore_best()
    # What retention decides now, in this process: it sees the steps this process protects
    # (the one it resumed from, the best one), which another process would not.
    kept = store.prune(dry_run=True).reasons
    _emit(
        "done",
        stop_step=last,
        best_step=policy.best_step,
        reason=policy.stop_reason,
        digest=final_digest,
        best_digest=state.digest(),
        best_record_step=best.step,
        kept=[[step, list(reasons)] for step, reasons in sorted(kept.items())],
    )


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Float sums must run in the same order in every worker; pin BLAS to one thread so a
    # different thread split cannot change the low bits.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _start_worker(root: Path, pause_in_epoch: int | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "ckptkit.demo", "--worker", "--root", str(root)]
    if pause_in_epoch is not None:
        cmd += ["--pause-in-epoch", str(pause_in_epoch)]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env()
    )


def run_worker(root: Path, *, kill_in_epoch: int | None = None) -> list[dict[str, Any]]:
    """Run a worker on ``root`` and return its events; with ``kill_in_epoch``, SIGKILL it there.

    Raises:
        RuntimeError: the worker failed, or finished before reaching ``kill_in_epoch``.
    """
    proc = _start_worker(root, kill_in_epoch)
    assert proc.stdout is not None and proc.stdin is not None
    events: list[dict[str, Any]] = []
    with proc:
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "paused":
                proc.send_signal(signal.SIGKILL)
                break
        proc.stdin.close()
        code = proc.wait()
    if kill_in_epoch is not None and code != -signal.SIGKILL:
        raise RuntimeError(
            f"the worker was to be killed in epoch {kill_in_epoch} but exited with status "
            f"{code} (training may stop before that epoch; choose a smaller --kill-after)"
        )
    if kill_in_epoch is None and code != 0:
        raise RuntimeError(f"the training worker on {root} failed with exit status {code}")
    return events


def trees_identical(a: Any, b: Any) -> bool:
    """Whether two state trees hold the same structure, dtypes and bytes."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(trees_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(trees_identical, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    return type(a) is type(b) and bool(a == b)


def compare_stores(reference: Path, resumed: Path) -> list[str]:
    """What differs between the reference store's checkpoints and the same steps in the other.

    The resumed store may keep one checkpoint more: the one it resumed from, which the
    resuming process protects from retention.
    """
    ref, res = CheckpointStore(reference), CheckpointStore(resumed)
    problems = []
    others = {r.step: r for r in res.records()}
    for record in ref.records():
        other = others.get(record.step)
        if other is None:
            problems.append(f"the checkpoint of epoch {record.step} was not kept")
        elif not trees_identical(
            (dict(record.metrics), dict(record.metadata)),
            (dict(other.metrics), dict(other.metadata)),
        ):
            problems.append(f"the metrics or metadata of epoch {record.step} differ")
        elif not trees_identical(ref.load(record.step), res.load(record.step)):
            problems.append(f"the checkpoint of epoch {record.step} differs")
    return problems


#: How the summary names each reason of a ``RetentionPlan``.
_RULE_NAMES = {
    "last": "keep_last",
    "best": "keep_best",
    "every": "keep_every",
    "all": "no rule set",
    "pinned": "pinned",
    "newest": "newest",
}


def _kept_by(reasons: Sequence[str], step: int, *, restored: int | None, best: int) -> str:
    """The retention rules that keep ``step``, naming why a protected step is protected."""
    labels = []
    for reason in reasons:
        if reason == "protected":
            why = [w for w, s in (("resumed from", restored), ("best", best)) if s == step]
            labels.append(f"protected ({', '.join(why)})" if why else "protected")
        else:
            labels.append(_RULE_NAMES[reason])
    return ", ".join(labels)


def _summary(
    root: Path,
    ref: dict[str, Any],
    killed: list[dict[str, Any]],
    resumed: list[dict[str, Any]],
    problems: list[str],
) -> list[str]:
    paused, start, done = killed[-1], resumed[0], resumed[-1]
    committed = [e["step"] for e in killed if e["event"] == "committed"]
    store = CheckpointStore(root / "resumed", monitor="val_loss")
    latest, best = store.latest(), store.best()
    kept = {step: reasons for step, reasons in done["kept"]}
    lines = [
        f"ckptkit demo: numpy MLP, SGD with momentum, early stop on val_loss (patience {PATIENCE})",
        f"stores under {root}",
        f"reference run: uninterrupted, stopped at epoch {ref['stop_step']}, "
        f"best epoch {ref['best_step']}",
        f"second run:    SIGKILLed in the middle of epoch {paused['step']} "
        f"(batch {paused['batch']}), last committed epoch {committed[-1] if committed else None}",
        f"resumed run:   restored epoch {start['restored']}, trained from epoch "
        f"{start['next_step']} to {done['stop_step']}, best epoch {done['best_step']}",
        "kept checkpoints (keep_last=2, keep_best=2), with what keeps each:",
        "  epoch  val_loss     acc          kept by",
    ]
    for record in store.records():
        tags = [t for t, r in (("best", best), ("latest", latest)) if r and r.step == record.step]
        kept_by = _kept_by(
            kept.get(record.step, ()),
            record.step,
            restored=start["restored"],
            best=done["best_record_step"],
        )
        lines.append(
            f"  {record.step:5d}  {record.metrics['val_loss']:8.5f}  {record.metrics['acc']:6.4f}"
            f"  {' '.join(tags):6}  {kept_by}".rstrip()
        )
    if kept.get(start["restored"]) == ["protected"]:
        lines += [
            f"epoch {start['restored']} is kept only because the resumed run restored it: a "
            "Checkpointer protects the checkpoint",
            "it resumed from for as long as its process runs; a later run's first save or prune "
            "deletes it",
        ]
    lines.append(f"stop reason: {done['reason'] or f'none, reached {MAX_EPOCHS} epochs'}")
    lines += [f"  difference: {p}" for p in problems]
    lines.append(f"identical to the uninterrupted run: {'no' if problems else 'yes'}")
    return lines


def demo(root: Path, kill_after: int) -> int:
    """Run the three workers under ``root`` and print the summary; return the exit status."""
    reference = run_worker(root / "reference")[-1]
    killed = run_worker(root / "resumed", kill_in_epoch=kill_after + 1)
    resumed = run_worker(root / "resumed")
    done = resumed[-1]
    problems = compare_stores(root / "reference", root / "resumed")
    for key in ("stop_step", "best_step", "reason", "digest", "best_digest"):
        if reference[key] != done[key]:
            problems.append(f"{key}: {reference[key]!r} != {done[key]!r}")
    print("\n".join(_summary(root, reference, killed, resumed, problems)))
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point of ``python -m ckptkit.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m ckptkit.demo",
        description="Kill a training run with SIGKILL, resume it, and check that it ends bit for "
        "bit like an uninterrupted run.",
    )
    parser.add_argument("--root", type=Path, help="directory for the stores (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--kill-after",
        type=int,
        default=5,
        metavar="N",
        help="kill the second run in the epoch after epoch N (default 5)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pause-in-epoch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.root is None:
            parser.error("--worker needs --root")
        train(args.root, pause_in_epoch=args.pause_in_epoch)
        return 0
    if args.kill_after < 0:
        parser.error("--kill-after must be 0 or more")
    if args.root is not None:
        for sub in ("reference", "resumed"):
            if (args.root / sub).exists() and any((args.root / sub).iterdir()):
                parser.error(f"{args.root / sub} is not empty; choose an empty --root")
        return _run(args.root, args.kill_after)
    root = Path(tempfile.mkdtemp(prefix="ckptkit-demo-"))
    try:
        return _run(root, args.kill_after)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, kill_after: int) -> int:
    try:
        return demo(root, kill_after)
    except RuntimeError as exc:
        print(f"ckptkit demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
