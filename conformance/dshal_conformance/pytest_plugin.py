"""pytest plugin (entry point ``pytest11``): run the suite inside pytest.

    pytest --pyargs dshal_conformance --dshal-backend NAME [--dshal-tier full]
           [--dshal-ops a,b] [--dshal-case ID] [--dshal-waivers F] [--dshal-report-dir DIR]
           [--dshal-allow-unavailable]

One test per result id (``test_conformance[rms_norm/bf16/T4xH256]``): pass -> passed,
fail/error -> failed with the case's reason, skip/unsupported -> skipped with the reason.
As with ``dshal conformance``: an unknown op or a selection of no case is a usage error, and
a backend that cannot run here is one failed test (``not-run``, with the reason) unless
``--dshal-allow-unavailable`` makes it a skip; a plugin that fails to load always fails.
With ``--dshal-report-dir`` the JSON report and JUnit XML are written at the end, exactly
as ``dshal conformance`` writes them. Without ``--dshal-backend`` the suite's tests are
skipped, so installing this package never changes another project's test run.
"""

from __future__ import annotations

from typing import Any

import pytest

_STATE_KEY = "dshal_conformance_session"
_SESSION = pytest.StashKey[Any]()
#: The op names of --dshal-ops, checked at configure time (None: every op).
_OPS = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dshal-conformance", "dshal conformance suite")
    group.addoption("--dshal-backend", metavar="NAME", help="run the dshal conformance suite against this backend")
    group.addoption("--dshal-tier", choices=("ci", "full"), default="ci", help="case tier (default: ci)")
    group.addoption("--dshal-ops", metavar="A,B", help="only these ops")
    group.addoption("--dshal-case", action="append", metavar="ID", help="only this case id (glob; repeatable)")
    group.addoption("--dshal-waivers", metavar="PATH", help="waivers file (default: the conformance-waivers.yaml shipped in the plugin's package)")
    group.addoption("--dshal-seed", type=int, default=None, help="run seed")
    group.addoption("--dshal-emulate", action="store_true", default=None, help="emulate mode (as DSHAL_EMULATE=1)")
    group.addoption("--dshal-report-dir", metavar="DIR", help="write NAME.json and NAME.junit.xml here at the end")
    group.addoption("--dshal-allow-unavailable", action="store_true",
                    help="skip (not fail) when the backend cannot run here (no device, plugin missing); a plugin "
                         "that fails to load still fails")


def pytest_configure(config: pytest.Config) -> None:
    """A selection of nothing is a usage error before collection: nothing to check is not a pass."""
    if not config.getoption("--dshal-backend", None):
        return
    from dshal.errors import ArgumentError  # lazy: start-up time of every pytest run (a pytest11 plugin)
    from dshal_conformance import runner  # lazy: as above

    try:
        config.stash[_OPS] = runner.check_selection(config.getoption("--dshal-tier"), config.getoption("--dshal-ops"),
                                                    config.getoption("--dshal-case"), ops_flag="--dshal-ops",
                                                    case_flag="--dshal-case")
    except ArgumentError as err:
        raise pytest.UsageError(str(err)) from None


def _session(config: pytest.Config) -> Any:
    """The conformance Session, built on first use (None without --dshal-backend)."""
    if not config.getoption("--dshal-backend"):
        return None
    session = config.stash.get(_SESSION, None)
    if session is None:
        from pathlib import Path

        from dshal_conformance import runner, waivers  # lazy: start-up time of every pytest run (a pytest11 plugin)

        name = config.getoption("--dshal-backend")
        seed = config.getoption("--dshal-seed")
        tier = config.getoption("--dshal-tier")
        options = runner.Options(
            tier=tier,
            case_timeout_s=runner.default_timeout(tier),
            ops=config.stash.get(_OPS, None),
            cases=config.getoption("--dshal-case"),
            seed=runner.DEFAULT_SEED if seed is None else seed,
            progress=False,
        )
        target = runner.resolve(name, config.getoption("--dshal-emulate"))
        path = config.getoption("--dshal-waivers")
        if path is None and target.runtime is not None:
            path = waivers.default_path(target.runtime.backend, name)
        if path is not None:
            options.waivers = waivers.load(Path(path))
        session = runner.Session(target, options)
        session.done = {}  # result id -> record
        config.stash[_SESSION] = session
    return session


#: The one result id of a backend that did not run.
NOT_RUN = "not-run"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dshal_result_id" not in metafunc.fixturenames:
        return
    session = _session(metafunc.config)
    if session is None:
        reason = "pass --dshal-backend NAME to run the dshal conformance suite"
        metafunc.parametrize("dshal_result_id", [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["not-selected"])
        return
    target = session.target
    if target.runtime is None:
        reason = f"backend {target.name!r} not run: {target.not_run}"
        if metafunc.config.getoption("--dshal-allow-unavailable") and not target.broken_leg:
            metafunc.parametrize("dshal_result_id", [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["not-run"])
        else:  # as `dshal conformance`: not run is a failure unless allowed, a broken plugin always
            session.done[NOT_RUN] = {"id": NOT_RUN, "status": "error", "reason": reason}
            metafunc.parametrize("dshal_result_id", [NOT_RUN], ids=[NOT_RUN])
        return
    ids = [rid for case in session.cases for rid in case.result_ids()]
    metafunc.parametrize("dshal_result_id", ids, ids=ids)


@pytest.fixture
def dshal_result(request: pytest.FixtureRequest, dshal_result_id: str) -> dict[str, Any]:
    """The record of one result id, running its case (or its collective group) on first need."""
    session = _session(request.config)
    if dshal_result_id not in session.done:
        case = next(c for c in session.cases if dshal_result_id in c.result_ids())
        if case.kind == "collective":
            group = [c for c in session.cases if c.kind == "collective" and c.world_size == case.world_size and c.id not in session.done]
            records = session.run_collectives(case.world_size, group)
        else:
            records = session.run_case(case)
        session.done.update({r["id"]: r for r in records})
    return session.done[dshal_result_id]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    conf = session.config
    state = conf.stash.get(_SESSION, None)
    out_dir = conf.getoption("--dshal-report-dir", None)
    if state is None or not out_dir:
        return
    from pathlib import Path

    from dshal_conformance import report  # lazy: start-up time of every pytest run (a pytest11 plugin)

    result = state.report()
    report.validate(result)
    report.write_json(result, Path(out_dir) / f"{state.target.name}.json")
    report.write_junit(result, Path(out_dir) / f"{state.target.name}.junit.xml")
