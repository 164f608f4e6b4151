"""``ckptkit verify``, ``prune``, ``pin`` and ``unpin``: checking and changing a store."""

from __future__ import annotations

import argparse

from ckptkit._cli._common import (
    FAILED,
    USAGE,
    CliError,
    human_size,
    open_store,
    policy_state,
    print_json,
    resolve,
    select,
)
from ckptkit._errors import CheckpointNotFoundError, CorruptCheckpointError


def verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    records = store.records()
    ranking = resolve(args.monitor, args.mode, policy_state(records[-1] if records else None))
    chosen = records if args.step is None else [select(store, records, args.step, ranking)]
    results: list[tuple[int, str | None]] = []
    for record in chosen:
        try:
            store.verify(record.step)
        except CheckpointNotFoundError:
            if args.step is not None:
                raise
            continue  # deleted by another process (retention) after the listing: not corrupt
        except CorruptCheckpointError as e:
            results.append((record.step, str(e)))
        else:
            results.append((record.step, None))
    bad = sum(error is not None for _, error in results)
    if args.json:
        print_json(
            {
                "root": str(store.root),
                "ok": bad == 0,
                "checkpoints": [
                    {"step": step, "ok": error is None, "error": error} for step, error in results
                ],
            }
        )
    else:
        for step, error in results:
            print(f"step {step}: {'ok' if error is None else 'BAD: ' + error}")
        print(f"{len(results)} checked, {len(results) - bad} ok, {bad} bad")
    return FAILED if bad else 0


def prune(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_best is None and args.keep_every is None:
        raise CliError(
            "prune needs at least one of --keep-last, --keep-best, --keep-every (without a "
            "retention option every checkpoint is kept, so there is nothing to prune)",
            USAGE,
        )
    store = open_store(args)
    records = store.records()
    ranking = None
    if args.keep_best is not None or args.monitor is not None:
        ranking = resolve(args.monitor, args.mode, policy_state(records[-1] if records else None))
        if ranking is None:
            raise CliError("--keep-best needs --monitor NAME: the metric to rank checkpoints by")
        if args.keep_best and not any(ranking[0] in r.metrics for r in records):
            names = sorted({name for r in records for name in r.metrics})
            # A misspelt monitor would rank nothing and let --keep-best keep nothing.
            raise CliError(
                f"no checkpoint has a {ranking[0]!r} metric to rank by for --keep-best; "
                f"the metrics there are: {names}"
            )
    store = open_store(
        args,
        writable=not args.dry_run,
        keep_last=args.keep_last,
        keep_best=args.keep_best,
        keep_every=args.keep_every,
        monitor=None if ranking is None else ranking[0],
        mode="auto" if ranking is None else ranking[1],
    )
    plan = store.prune(dry_run=args.dry_run)
    sizes = {r.step: r.size for r in records}
    freed = sum(sizes.get(step, 0) for step in plan.delete)
    if args.json:
        print_json(
            {
                "root": str(store.root),
                "dry_run": args.dry_run,
                "monitor": None if ranking is None else ranking[0],
                "mode": None if ranking is None else ranking[1],
                "kept": [
                    {"step": step, "reasons": list(plan.reasons[step])}
                    for step in sorted(plan.keep)
                ],
                "deleted": list(plan.delete),
                "freed_bytes": freed,
            }
        )
        return 0
    if ranking is not None:
        print(f"ranking by {ranking[0]} ({ranking[1]}, from {ranking[2]})")
    verb = "would delete" if args.dry_run else "deleted"
    for step in sorted({*plan.keep, *plan.delete}):
        what = f"keep ({', '.join(plan.reasons[step])})" if step in plan.keep else verb
        print(f"step {step}: {what}")
    n = len(plan.delete)
    deleted = f"{n} checkpoint{'' if n == 1 else 's'} ({human_size(freed)})"
    if args.dry_run:
        print(f"dry run: would delete {deleted} and keep {len(plan.keep)}; nothing was deleted")
    else:
        print(f"deleted {deleted}, kept {len(plan.keep)}")
    return 0


def pin(args: argparse.Namespace) -> int:
    return _set_pinned(args, pinned=True)


def unpin(args: argparse.Namespace) -> int:
    return _set_pinned(args, pinned=False)


def _set_pinned(args: argparse.Namespace, *, pinned: bool) -> int:
    store = open_store(args, writable=True)
    records = store.records()
    ranking = resolve(args.monitor, args.mode, policy_state(records[-1] if records else None))
    record = select(store, records, args.step, ranking)
    was = record.pinned
    updated = store.pin(record.step) if pinned else store.unpin(record.step)
    if args.json:
        print_json({"root": str(store.root), "step": updated.step, "pinned": updated.pinned})
    elif was == pinned:
        print(f"step {record.step} was already {'pinned' if pinned else 'not pinned'}")
    elif pinned:
        print(f"pinned step {record.step}: retention will never delete it")
    else:
        print(f"unpinned step {record.step}: retention may delete it at the next save or prune")
    return 0
