"""The ``dshal`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; only the module of the subcommand being run is imported, so
``dshal info`` never pays for the model core or the conformance suite.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from dshal import __version__
from dshal.cgroups import cpu_quota
from dshal.error_file import error_line, record_failure
from dshal.errors import ConfigError, DshalError
from dshal.lifetime import Terminated, cleanup_on_termination, signal_name
from dshal.outputs import is_terminal

#: name -> (module, one-line help, distribution that provides it)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("dshal.info", "list discovered backends, their availability, capabilities and op providers", "dshal"),
    "conformance": (
        "dshal_conformance.conformance_command",
        "run the shared conformance suite against a backend and write JSON + JUnit reports",
        "dshal-conformance",
    ),
    "matrix": ("dshal_conformance.matrix", "merge conformance reports into the hardware matrix (HTML, Markdown)", "dshal-conformance"),
    "run": ("dshal.run_command", "run the DeepSeek-V3 model core (tiny built-in model by default) and report tokens/s", "dshal"),
    "bench": ("dshal.perf.bench_command", "per-op latency, FLOP/s and bytes/s against the device roofline", "dshal"),
    "profile": ("dshal.perf.profile_command", "profile the model core per layer and op; find the bottlenecks", "dshal"),
    "plan": ("dshal.plan.command", "per-rank weights, KV cache, activations and traffic of a TP x EP job, on the meta device", "dshal"),
    "diff": ("dshal_conformance.diff_command", "run the model core on two backends; find the first layer and op where they drift apart (prefill and decode steps)", "dshal-conformance"),
    "kernels": ("dshal.kernels.kernels_command", "cross-compile every shipped Triton kernel config for sm_90a/sm_100a/sm_120a/gfx942/gfx950", "dshal"),
    "tune": ("dshal.kernels.tune_command", "time the block-FP8 GEMM's tiles per (N, K, M bucket) on this GPU; write its tuned table", "dshal"),
}

EPILOG = """\
environment:
  DSHAL_CONFIG    config file used when none is given
  DSHAL_BACKEND   backend name, overrides the config's `backend`
  DSHAL_PLUGINS   comma-separated allow-list of plugins to discover
  DSHAL_EMULATE   1 = run GPU plugins' own code paths on CPU tensors
  DSHAL_CPU_KERNELS  0 = no C kernels for the cpu backend (torch serves their ops); read
                     once, when the cpu backend first uses them
  DSHAL_CACHE_DIR    dshal's cache: built C kernels, cross-compiled kernels, `dshal tune`
                     tables (default $XDG_CACHE_HOME/dshal, else ~/.cache/dshal, else, with
                     no usable home, dshal-cache-<uid> in the temporary folder); the C
                     kernels' folder is read once, when they are first loaded
  DSHAL_CPU_DEQUANT_CACHE_GIB  cpu backend: GiB of float32 copies of FP8 weights kept for
                     prefill (past it, dequantized per call; 0 = none; default 1/4 of RAM, or of
                     a container's memory limit)
  DSHAL_CHECK_FINITE 0 = skip the load-time NaN/Inf scan of checkpoint weights
  DSHAL_PLUGIN_TIMEOUT_S  seconds a plugin's availability()/capabilities() may take (default 60;
                     an import, constructor or ops() still running then is warned about)
  DSHAL_CONFORMANCE_LEG  `dshal conformance`: the CI leg its report names (platform.leg),
                     which `dshal matrix --expect` looks for
  DSHAL_CGROUP_ROOT  test / operations knob: the folder of cgroup files to read a container's
                     CPU quota and memory limit from (default /sys/fs/cgroup; the process's
                     cgroup under it, else the folder itself); run, bench, profile, conformance
                     and diff cap torch's CPU threads at the quota unless OMP_NUM_THREADS,
                     MKL_NUM_THREADS or --threads says otherwise
  DSHAL_LOG          debug | info | warning | error: the least severe of dshal's log records
                     written to stderr (default: warnings only, and at a terminal the note
                     that the first run compiles the C kernels); -v is info, -vv debug

exit status:
  0    done, and every check passed
  1    an error, said in one line on stderr (`dshal COMMAND: error: ...`), or a check that
       failed: a conformance case failed, errored or was not run, a `matrix` gate
       (--fail-on-regression, --expect), a `kernels` config or `bench` case that failed;
       `run --tp N` exits with the first failing rank's own status (1 when a signal ended it)
  2    the command line did not parse (the usage and the error on stderr), or no COMMAND
  68   a rank of a parallel job (`torchrun ... -m dshal run`) that met an error another rank
       said: an error the ranks share is said once, by the lowest rank
  130  interrupted (Ctrl-C)
  141  the output's reader left (`dshal info | head -1`), in silence
  143, 129  SIGTERM, SIGHUP (as a shell reports them: 128 + the signal)

Run `dshal COMMAND --help` for a command's options.
"""


#: Commands whose work runs on torch's CPU threads: capped to a container's CPU quota.
THREADED_COMMANDS = frozenset({"run", "bench", "profile", "conformance", "diff"})
#: Variables through which a user sets torch's CPU threads themselves (torch reads both).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

log = logging.getLogger(__name__)

VERBOSE_HELP = "log more on stderr: -v info (the backend chosen, candidates passed over, fallbacks), -vv debug"
#: DSHAL_LOG's values -> logging levels.
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def log_level(verbose: int, env: str | None) -> int | None:
    """The level the ``dshal`` logger is set to for ``-v`` given ``verbose`` times and
    ``DSHAL_LOG``=``env`` (the more verbose of the two), or None: neither asks, and records go
    where the embedding program's logging config sends them (without one: warnings on stderr)."""
    levels = []
    if env is not None and env.strip():
        name = env.strip().lower()
        if name not in LOG_LEVELS:
            raise ConfigError(f"environment variable DSHAL_LOG is {env!r}, expected one of {', '.join(LOG_LEVELS)}")
        levels.append(LOG_LEVELS[name])
    if verbose:
        levels.append(logging.INFO if verbose == 1 else logging.DEBUG)
    return min(levels) if levels else None


#: Loggers whose info records the command shows at a terminal without -v or DSHAL_LOG: a wait
#: of seconds that would otherwise be silent (the first run compiling the cpu backend's C kernels).
TERMINAL_NOTICES = ("dshal.kernels.cpu._library",)


@contextlib.contextmanager
def command_logging(level: int | None) -> Iterator[None]:
    """For the command only (a library adds no handlers): while it runs, the ``dshal`` logger's
    records from ``level`` on go to stderr as bare messages, the form logging's last resort
    gives warnings, and to no other handler (a program calling :func:`main` in-process with its
    own logging config printed each record twice). With no ``level`` asked, and stderr a
    terminal, the :data:`TERMINAL_NOTICES` loggers' info records go there so. Undone after."""
    if level is None and not is_terminal(sys.stderr):
        yield
        return
    names = ("dshal",) if level is not None else TERMINAL_NOTICES
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in names]
    was = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO if level is None else level)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, (old_level, old_propagate) in zip(loggers, was):
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate


@contextlib.contextmanager
def threads_within_cpu_quota(command: str | None) -> Iterator[int | None]:
    """For ``command``'s run (a library leaves the process's threads alone): torch's intra-op
    threads capped at the container's CPU quota, rounded up, where torch chose more (it counts
    the CPUs it may run on, not the quota, and threads past the quota stall each period).
    Yields the cap, or None: no quota, torch's count within it, or the user chose (OMP_NUM_THREADS,
    MKL_NUM_THREADS; ``--threads`` is applied later and wins). Undone after, where nothing else
    changed it, for a program that calls :func:`main` in-process."""
    quota = cpu_quota() if command in THREADED_COMMANDS else None
    if quota is None or any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES):
        yield None
        return
    import torch  # only commands that run torch import it (they do anyway)

    was = torch.get_num_threads()
    if was <= quota.whole:
        yield None
        return
    torch.set_num_threads(quota.whole)
    flag = " (or --threads)" if command in ("bench", "profile") else ""
    log.info("dshal %s: torch CPU threads %d -> %d, the container's CPU quota (%g CPU(s), %s); set OMP_NUM_THREADS%s "
             "to choose", command, was, quota.whole, quota.cpus, quota.file, flag)
    try:
        yield quota.whole
    finally:
        if torch.get_num_threads() == quota.whole:
            torch.set_num_threads(was)


@contextlib.contextmanager
def caller_state_kept(command: str | None) -> Iterator[None]:
    """For a program that calls :func:`main` in-process: what a command sets for its own run is
    given back after it, namely torch's CPU thread count (``bench`` / ``profile --threads``) and
    dshal's active runtime (the command's ``--backend`` / ``--config``: the caller's own
    ``dshal.use()`` holds again, or none is active if none was)."""
    threads = None
    if command in THREADED_COMMANDS:
        import torch  # only commands that run torch import it (they do anyway)

        threads = torch.get_num_threads()
    runtime = sys.modules.get("dshal.runtime")  # not imported yet: no runtime is active
    try:
        with runtime.active_kept() if runtime is not None else contextlib.nullcontext():
            yield
    finally:
        if runtime is None and (imported := sys.modules.get("dshal.runtime")) is not None:
            imported.reset()
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog="dshal",
        description="dshal: one DeepSeek-V3 model core on any accelerator, through vendor plugins.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dshal {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text, dist) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        # After the command too, counted apart: the subparser's value replaced the count given before it.
        p.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0, help=VERBOSE_HELP)
        if name == command:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name and module_name.startswith(err.name):
                    parser.exit(2, f"dshal {name}: needs the {dist!r} distribution ({err}); install it with pip\n")
                raise
            module.add_arguments(p)
            p.set_defaults(_main=module.main, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dshal ARGV`` and return its exit status (argparse's ``--help`` and usage errors raise
    SystemExit, as in any argparse program). Called in-process, the caller's torch thread
    count, active dshal runtime, logging and signal handlers are as they were when it returns
    (:func:`caller_state_kept`, :func:`command_logging`, ``cleanup_on_termination``); stdout
    and stderr keep ``errors="backslashreplace"`` where their encoding is not UTF-8."""
    _printable_streams()
    try:
        code = _main(argv)
        if sys.stdout is not None:  # a reader that left is met here, not in the interpreter's flush at exit
            sys.stdout.flush()
        return code
    except KeyboardInterrupt:  # Ctrl-C while a command's modules were still importing
        print("dshal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dshal ... | head`: the reader left; no traceback, as other CLIs
        # stdout is redirected so that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command a pipe ended


def _printable_streams() -> None:
    """Output that the streams' encoding cannot hold (PYTHONIOENCODING=ascii, a non-UTF-8
    locale: a path or prompt with non-ASCII letters, a "≥" in a summary) is written escaped
    (``\\u2265``): the error came after the work was done, and lost the lines after it."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding not in ("utf8", "utf8sig") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _flag_hints(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """For each unknown flag: that it belongs after the command (``dshal --json info``: the
    command's own flag given before it), or the command's flag it is closest to (a typo)."""
    flags = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        if name in flags:
            hints.append(f"{name} is an option of `{parser.prog}`: give it after the command")
        # Compared without the dashes, which every flag shares (--bogus read as close to --verbose).
        elif close := difflib.get_close_matches(name.lstrip("-"), [flag.lstrip("-") for flag in flags], n=1):
            hints.append(f"did you mean {next(flag for flag in flags if flag.lstrip('-') == close[0])}?")
    return "".join(f"; {hint}" for hint in hints)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    if command is not None and command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        if close:  # argparse itself only lists the choices
            parser.error(f"argument COMMAND: invalid choice: {command!r}; did you mean {close[0]!r}? "
                         f"(choose from {', '.join(SUBCOMMANDS)})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the command's usage, not the top-level one
        said = getattr(args, "_parser", parser)
        said.error(f"unrecognized arguments: {' '.join(unknown)}{_flag_hints(unknown, said)}")
    if args.command is None:  # a usage error (2): on stderr, as argparse's own
        parser.print_help(sys.stderr)
        return 2
    try:
        with (
            caller_state_kept(args.command),
            cleanup_on_termination(),
            command_logging(log_level(args.verbose + getattr(args, "verbose_after", 0), os.environ.get("DSHAL_LOG"))),
            threads_within_cpu_quota(args.command),
        ):
            return int(args._main(args) or 0)  # SIGTERM / SIGHUP (`timeout`, `kill`): unwind, then 143 / 129
    except Terminated as err:
        line = f"dshal {args.command}: terminated ({signal_name(err.signum)})"
        print(line, file=sys.stderr)
        record_failure(line, consequence=True)  # under torchrun: most often its agent, after another rank failed
        return int(err.code)
    except DshalError as err:
        line = error_line(args.command, err)
        print(line, file=sys.stderr)
        # under torchrun, its summary then names the error, not only an exit code; a collective that
        # failed because a peer did is stamped after that peer's failure (the agent's root cause)
        record_failure(line, consequence=getattr(err, "peer_failed", False))
        return 1
    except KeyboardInterrupt:
        print(f"dshal {args.command}: interrupted", file=sys.stderr)
        record_failure(f"dshal {args.command}: interrupted", consequence=True)
        return 130
    except BrokenPipeError:  # the reader left: main() ends it with 141, no failure
        raise
    except Exception as err:
        if isinstance(err, FileNotFoundError) and "No usable temporary directory" in str(err):
            # tempfile's, raised from torch's imports (dynamo) as much as from dshal
            line = f"dshal {args.command}: error: no writable temporary folder ({err}): set TMPDIR to one"
            print(line, file=sys.stderr)
            record_failure(line)
            return 1
        # a defect: Python prints its traceback, and under torchrun the agent's summary shows it too
        record_failure(f"dshal {args.command}: {type(err).__name__}: {err}", traceback.format_exc())
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
