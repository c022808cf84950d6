"""The ``raysub`` command line.

    raysub run [CONFIG] [key=value ...] [--resume | --overwrite]     sample → basis → train, then a table
    raysub sample [CONFIG] [key=value ...] [--resume | --overwrite]  stage 1: SGD baseline + trajectory
    raysub basis RUN_DIR [basis.dim=D ...] [--overwrite]             stage 2: distributed Gram basis
    raysub train RUN_DIR [train.KEY=V ...] [--resume | --overwrite]  stage 3: train z in the subspace
    raysub train CONFIG [key=value ...] [--resume | --overwrite]     a new run that needs no trajectory
                                                                     (a random or identity projection)
    raysub sweep CONFIG [key=value ...] [--resume | --overwrite]     intrinsic-dimension sweep on Ray Tune
    raysub l2o meta-train CONFIG [key=value ...] [--resume | --overwrite]
                                                                     meta-train the learned optimizer (l2o:)
    raysub l2o tune CONFIG [key=value ...] [--resume | --overwrite]  Ray Tune over the meta-hyperparameters
                                                                     (l2o_tune:): best config and weights

With no CONFIG, ``run`` and ``sample`` use the embedded quickstart (scikit-learn digits, offline). Flags may
stand anywhere among the arguments (``raysub run run_dir=x --overwrite sgd.epochs=2``). A run's own
``RUN/config.yaml`` runs in the directory it is read from, wherever the run was moved or copied.

Exit status and messages (always one line on stderr; ``--debug`` shows the full traceback instead):

    0    done
    1    a failure (a Ray worker, actor or storage error): the line names what failed and the ``--resume``
         command that continues; the traceback is in RUN_DIR/logs/error-TIME.log
    2    a bad input (config, path, run-directory state, a run directory in use): the line names it and the fix;
         nothing is written
    3    training diverged: the line names the stage, the epoch and what to change; a diverged subspace training
         is recorded as such in summary.json (``results.LABEL.diverged``), never with an accuracy
    130  interrupted (Ctrl-C): the line gives the ``--resume`` command
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import shlex
import sys
import traceback
from typing import List, Optional
import tempfile
from raysub import credentials
from raysub.errors import ConfigError, RaysubError
from raysub.credentials import mask

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
QUICKSTART = os.path.join(CONFIG_DIR, "quickstart.yaml")


def resolve_config(name: str) -> str:
    """A path, or the name of a shipped config (``fashion_mnist_lenet``)."""
    if os.path.exists(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    return shipped if os.path.exists(shipped) else name


def _split(args: List[str]):
    config = None
    # a URI's query has "=" too (s3://b/run/config.yaml?endpoint_override=h:p): a key=value never has "://"
    if args and ("=" not in args[0] or "://" in args[0].split("=", 1)[0]):
        config, args = args[0], args[1:]
    return config, args


def _parse_anywhere(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with flags anywhere among the positionals, as users type them
    (``raysub run run_dir=x --overwrite sgd.epochs=2``): argparse takes the positionals before the first flag and
    leaves the ones after it over; they are the command's further ``key=value`` overrides, in order."""
    ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    target = "args" if hasattr(ns, "args") else "overrides"
    if unknown or not hasattr(ns, target):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    setattr(ns, target, [*getattr(ns, target), *rest])
    return ns


def main(argv: Optional[List[str]] = None) -> int:

    credentials.mask_output()  # every line printed from here on, Ray's forwarded worker logs included
    try:  # credentials written into a URI go to the environment: argv, and all that echoes or stores it, is clean
        argv = credentials.clean_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"raysub: error: {exc}", file=sys.stderr)
        return exc.exit_code
    parser = argparse.ArgumentParser(prog="raysub", description="Train neural networks in tiny subspaces on Ray.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # --over is not --overwrite
    for name, helptext in (("run", "the whole DLDR pipeline"), ("sample", "SGD baseline and trajectory sampling")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="YAML config, then dotted overrides")
        p.add_argument("--resume", action="store_true", help="continue an existing run directory")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p = sub.add_parser("sweep", help="intrinsic-dimension sweep: projection family x d x seed on Ray Tune")
    p.add_argument("args", nargs="+", metavar="CONFIG [key=value]", help="YAML config (or shipped name), overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep directory")
    p = sub.add_parser("basis", help="build the trajectory basis of a sampled run")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--overwrite", action="store_true", help="replace an existing basis")
    p = sub.add_parser("train", help="train in the subspace of a run (RUN_DIR), or a new run from a CONFIG whose "
                                     "projection needs no trajectory")
    p.add_argument("run_dir", metavar="RUN_DIR|CONFIG")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--overwrite", action="store_true", help="replace this label's results")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p = sub.add_parser("l2o", help="the learned optimizer (SL2O)")
    l2o_sub = p.add_subparsers(dest="l2o_command", required=True)
    mt = l2o_sub.add_parser("meta-train", help="meta-train φ on Ray actors (config section l2o)",
                            allow_abbrev=False)
    mt.add_argument("args", nargs="+", metavar="CONFIG [key=value]", help="YAML config (or shipped name), overrides")
    mt.add_argument("--resume", action="store_true", help="continue from the committed checkpoint (RUN/l2o/ckpt/GEN/)")
    mt.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    mt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    lt = l2o_sub.add_parser("tune", help="Ray Tune over l2o meta-hyperparameters (config section l2o_tune)",
                            allow_abbrev=False)
    lt.add_argument("args", nargs="+", metavar="CONFIG [key=value]", help="YAML config (or shipped name), overrides")
    lt.add_argument("--resume", action="store_true", help="continue an interrupted tuning (Tuner.restore)")
    lt.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    lt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    for p in sub.choices.values():  # --debug also after the command
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parse_anywhere(parser, argv)

    # lazy: pyarrow loads only for this command, not for `raysub --help` or a config check
    from raysub.engine.cluster import unwrap_train_error
    from raysub.lock import RunLocked, lost_lock

    try:
        try:
            return _dispatch(ns)
        except (KeyboardInterrupt, Exception):
            lost = lost_lock()  # the heartbeat interrupted it: another command took the run over; no log written
            if lost is None or ns.debug:
                raise
            print(f"raysub: error: {lost}", file=sys.stderr)
            return RunLocked.exit_code
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print(f"raysub: interrupted; continue with: {resume_command(argv)}", file=sys.stderr)
        return 130
    except Exception as exc:
        err = unwrap_train_error(exc)
        if ns.debug:
            raise
        if isinstance(err, RaysubError):  # each type carries its exit code: no special cases here
            print(f"raysub: error: {'; '.join(err.problems)}", file=sys.stderr)
            return err.exit_code
        log = _write_log(getattr(ns, "run_uri", None), exc)
        print(f"raysub: error: {describe_failure(exc)}; full traceback in {log} (or rerun with --debug); fix the "
              f"cause and continue with: {resume_command(argv)}", file=sys.stderr)
        return 1


def resume_command(argv: List[str]) -> str:
    """The command line that continues this one: the same arguments with ``--resume`` instead of ``--overwrite``
    (``raysub basis`` has no resume: it is rerun)."""

    args = [mask(a) for a in argv if a not in ("--resume", "--overwrite", "--debug")]
    return shlex.join(["raysub", *args, "--overwrite" if args and args[0] == "basis" else "--resume"])


def describe_failure(exc: BaseException) -> str:
    """What failed, in a few words: the innermost error of a Ray Train worker, actor or task, or a storage error."""
    # lazy: pyarrow loads only for this command, not for `raysub --help` or a config check
    from raysub.engine.cluster import failure_kind, innermost_error
    from raysub.storage import TIMEOUT_ENV, StorageTimeout, storage_timeout, timed_out

    inner = innermost_error(exc)
    what = failure_kind(exc, inner)  # by Ray's exception types
    first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    if timed_out(inner) and not isinstance(inner, StorageTimeout):  # pyarrow's own words bury it: say it first
        what += f": the storage did not answer within {storage_timeout():g} s ({TIMEOUT_ENV}); check the endpoint"
    text = f"{what} ({type(inner).__name__}: {first[:300]})" if first else f"{what} ({type(inner).__name__})"
    return mask(text)


def _write_log(run_uri: Optional[str], exc: BaseException) -> str:
    """The traceback of ``exc`` in RUN_DIR/logs/error-TIME.log (a temporary file when there is no run directory
    or it cannot be written); returns where."""

    text = mask("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_uri:
        try:
            # lazy: pyarrow loads only for this command, not for `raysub --help` or a config check
            from raysub.storage import RunDir, join_uri, redact

            run = RunDir(run_uri)
            if run.exists():
                run.write_text(f"logs/error-{stamp}.log", text)
                return join_uri(redact(run.uri), "logs", f"error-{stamp}.log")
        except Exception:
            pass

    fd, path = tempfile.mkstemp(prefix=f"raysub-error-{stamp}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _dispatch(ns) -> int:
    """Run the command; ``ns.run_uri`` is set to its run directory as soon as it is known (for the error log)."""
    # lazy: pyarrow loads only for this command, not for `raysub --help` or a config check
    from raysub import pipeline
    from raysub.config import load_config

    ns.run_uri = None
    if ns.command in ("run", "sample"):
        config, overrides = _split(ns.args)
        cfg = load_config(resolve_config(config) if config else QUICKSTART, overrides)
        ns.run_uri = cfg.run_dir
        if ns.command == "run":
            pipeline.run_pipeline(cfg, resume=ns.resume, overwrite=ns.overwrite)
        else:
            pipeline.stage_sample(cfg, resume=ns.resume, overwrite=ns.overwrite)
    elif ns.command == "sweep":
        # lazy: torch, pyarrow load only for this command, not for `raysub --help` or a config check
        from raysub.pipeline.sweep import run_sweep

        config, overrides = _split(ns.args)
        if config is None:
            raise ConfigError("raysub sweep needs a CONFIG first: a YAML file or a shipped name (sweep_digits, "
                              "sweep_fashion_mnist_fc, sweep_fashion_mnist_lenet)")
        cfg = load_config(resolve_config(config), overrides)
        ns.run_uri = cfg.run_dir
        run_sweep(cfg, resume=ns.resume, overwrite=ns.overwrite)
    elif ns.command == "l2o":
        # lazy: torch, pyarrow load only for this command, not for `raysub --help` or a config check
        from raysub.l2o.meta_train import meta_train
        from raysub.l2o.tune import tune_l2o

        config, overrides = _split(ns.args)
        if config is None:
            raise ConfigError(f"raysub l2o {ns.l2o_command} needs a CONFIG first: a YAML file or a shipped name")
        cfg = load_config(resolve_config(config), overrides)
        ns.run_uri = cfg.run_dir
        command = tune_l2o if ns.l2o_command == "tune" else meta_train
        command(cfg, resume=ns.resume, overwrite=ns.overwrite)
    elif ns.command == "basis":
        ns.run_uri = ns.run_dir
        pipeline.stage_basis(ns.run_dir, ns.overrides, overwrite=ns.overwrite)
    elif ns.command == "train":
        config = resolve_config(ns.run_dir)
        if config.endswith((".yaml", ".yml")) and os.path.isfile(config):
            cfg = load_config(config, ns.overrides)
            ns.run_uri = cfg.run_dir
            pipeline.train_from_config(cfg, resume=ns.resume, overwrite=ns.overwrite)
        else:
            ns.run_uri = ns.run_dir
            pipeline.stage_train(ns.run_dir, ns.overrides, overwrite=ns.overwrite, resume=ns.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
