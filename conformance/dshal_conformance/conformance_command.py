"""``dshal conformance``'s options, importable without torch: ``dshal conformance --help`` and
its usage errors start at once; :func:`main` imports the command
(:mod:`dshal_conformance.command`) to run it."""

from __future__ import annotations

import argparse

from dshal.cliargs import seed

#: The run seed when ``--seed`` gives none; each case mixes it with its id.
DEFAULT_SEED = 20250101
#: Per-case timeout (seconds) of the ci tier...
DEFAULT_CASE_TIMEOUT_S = 120.0
#: ...and of the full tier: its float64 oracles on DeepSeek-V3 sizes take minutes on a CPU.
FULL_TIER_CASE_TIMEOUT_S = 1800.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", required=True, metavar="NAME", help="backend to check (an installed dshal plugin, e.g. cpu, nvidia)")
    parser.add_argument("--ops", metavar="A,B", help="only these ops (comma-separated; collectives are named all_reduce, all_to_all...)")
    parser.add_argument("--tier", choices=("ci", "full"), default="ci", help="ci: small shapes (default); full: DeepSeek-V3 / DeepGEMM shapes")
    parser.add_argument("--report-dir", metavar="DIR", default="conformance-reports", help="where NAME.json and NAME.junit.xml go (default: %(default)s)")
    parser.add_argument("--case", action="append", metavar="ID", help="run only this case id (glob allowed; repeatable)")
    parser.add_argument("--seed", type=seed, default=DEFAULT_SEED, help="run seed; each case mixes it with its id (default: %(default)s)")
    parser.add_argument("--waivers", metavar="PATH", help="waivers file (default: the conformance-waivers.yaml shipped in the plugin's package)")
    parser.add_argument("--emulate", action="store_true", default=None, help="run the plugin's own code on CPU tensors (same as DSHAL_EMULATE=1)")
    parser.add_argument("--no-collectives", action="store_true", help="skip the multi-process collective cases")
    parser.add_argument("--determinism", choices=("default", "strict"), default=None,
                        help="strict: the backend serves its batch-invariant providers, and a determinism case it "
                             "then fails is a failure, not a finding")
    parser.add_argument(
        "--timeout", type=float, metavar="S",
        help=f"per-case timeout in seconds (default: {DEFAULT_CASE_TIMEOUT_S:g} for ci, {FULL_TIER_CASE_TIMEOUT_S:g} for full)",
    )
    parser.add_argument(
        "--budget-s", type=float, metavar="S",
        help="start no case after S seconds: the cases left are reported skipped (time budget), never passed, "
             "and the report is still written (a device window of fixed length; default: no limit)",
    )
    parser.add_argument("--bundle", metavar="DIR", help="also write a submission bundle (report, JUnit, environment, SHA256SUMS) to DIR")
    parser.add_argument("--allow-unavailable", action="store_true", help="exit 0 with a 'not run' report when the backend cannot run here")
    parser.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--traceback", action="store_true",
                        help="print each crashed case's whole traceback on stderr as it happens (the report keeps "
                             "one line: the exception and the file:line it was raised at)")


def main(args: argparse.Namespace) -> int:
    from dshal_conformance.command import main as run_conformance  # lazy: start-up time (--help loads no torch)

    return run_conformance(args)


__all__ = ["DEFAULT_CASE_TIMEOUT_S", "DEFAULT_SEED", "FULL_TIER_CASE_TIMEOUT_S", "add_arguments", "main"]
