"""The installed ``dshal`` console script, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dshal.backends.cpu_native import NATIVE_OPS
from dshal.ops.catalogue import SPECS

DSHAL = Path(sys.executable).with_name("dshal")


def run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if not DSHAL.exists():
        pytest.skip(f"console script not installed beside {sys.executable} (pip install -e . creates it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env.update(COLUMNS="200", **(extra_env or {}))
    return subprocess.run([str(DSHAL), *args], capture_output=True, text=True, env=env, timeout=120)


def test_info_json_lists_cpu_trace_and_providers():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    cpu = next(b for b in data["backends"] if b["name"] == "cpu")
    assert (cpu["loaded"], cpu["available"], cpu["entry_point"]) == (
        True, True, "dshal.backends.cpu:CpuBackend")
    assert cpu["capabilities"]["dist_backend"] == "gloo"
    # auto takes the first usable backend in prefer (cpu here; a GPU plugin on hardware)
    rt = data["runtime"]
    assert rt["config"]["backend"] == "auto"
    *passed, taken = rt["selection"]
    assert taken["taken"] and taken["name"] == rt["backend"]
    assert all(not d["taken"] and d["reason"] for d in passed)
    assert set(rt["providers"]) == set(SPECS)
    assert all(p["provider"] and p["kind"] for p in rt["providers"].values())


def test_info_json_with_backend_cpu_serves_every_op_from_cpu():
    out = run("info", "--json", "--backend", "cpu")
    assert out.returncode == 0, out.stderr
    rt = json.loads(out.stdout)["runtime"]
    assert rt["selection"] == [{"name": "cpu", "taken": True, "reason": rt["selection"][0]["reason"]}]
    kinds = {op: {"provider": p["provider"], "kind": p["kind"]} for op, p in rt["providers"].items()}
    assert kinds == {op: {"provider": "cpu", "kind": "native" if op in NATIVE_OPS else "reference"} for op in SPECS}
    # linear and moe_experts also say what serves each weight format (int8: the reference's W8A8 math).
    assert {op for op, p in rt["providers"].items() if "paths" in p} == {"linear", "moe_experts"}
    assert rt["providers"]["linear"]["paths"]["int8"]["kind"] == "reference"


def test_info_tables():
    out = run("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "dshal 0.1.0 backends" in text and "dshal.backends.cpu:CpuBackend" in text
    assert "selection (backend: auto)" in text and "taken  " in text and "op providers on " in text
    for op in SPECS:
        assert op in text
    # the installed distribution's version: a PyPI CUDA wheel's is 2.11.0 where torch says 2.11.0+cu130
    assert f"stack: torch {torch.__version__.split('+')[0]}" in text


def test_info_says_when_torch_or_triton_is_outside_the_checked_range(capsys):
    """versions.stack_report() was computed by gpu_check only: no command said that the running
    torch / Triton lies outside what dshal was checked on."""
    from dshal import info

    data = info.collect(backend="cpu")
    assert data["versions"]["torch"]["installed"].split("+")[0] == torch.__version__.split("+")[0]  # as above
    data["versions"]["torch"] = {"installed": "2.4.1", "supported": "2.11 - 2.13", "in_range": False}
    info._print_tables(data)
    text = " ".join(capsys.readouterr().out.split())
    assert "stack: torch 2.4.1 (outside the checked 2.11 - 2.13: may work, not tested)" in text


def test_info_shows_broken_plugins_from_the_environment(install_plugin):
    install_plugin("backends", {"goodtest": "GoodBackend", "oldapi": "OldApiBackend"})
    out = run("info", "--json", "--backend", "goodtest", extra_env={"PYTHONPATH": sys.path[0]})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    by_name = {b["name"]: b for b in data["backends"]}
    assert by_name["oldapi"]["loaded"] is False and "api_version '0'" in by_name["oldapi"]["reason"]
    assert by_name["goodtest"]["version"] == "0.1"
    assert data["runtime"]["providers"]["rms_norm"] == {"provider": "goodtest", "kind": "native"}
    assert data["runtime"]["providers"]["quantize_int8"] == {"provider": "reference", "kind": "fallback"}


@pytest.mark.parametrize("args", [("--help",), ("info", "--help")])
def test_help(args, capsys):
    from dshal.cli import main

    with pytest.raises(SystemExit) as caught:
        main(list(args))
    out = capsys.readouterr()
    assert caught.value.code == 0 and out.err == ""
    if args == ("--help",):
        assert all(cmd in out.out for cmd in ("info", "conformance", "matrix", "run", "bench", "profile"))
        assert "DSHAL_PLUGINS" in out.out
        # what a script or CI job may test for was said nowhere in --help
        status = out.out.split("\nexit status:\n", 1)[1]
        assert re.findall(r"^  (\d+)", status, flags=re.M) == ["0", "1", "2", "68", "130", "141", "143"]
    else:
        assert "--json" in out.out and "--backend NAME" in out.out


def test_every_dshal_variable_the_code_reads_is_in_the_help():
    """`dshal --help` lists the environment; DSHAL_CONFORMANCE_LEG, read by `dshal conformance`,
    was only in the READMEs. The variables the processes set for their own children are left out."""
    from dshal.cli import EPILOG

    internal = {"DSHAL_LAUNCHER_PID", "DSHAL_PROBE"}  # a rank's launcher; the Ascend probe's output marker
    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("dshal/**/*.py"), *root.glob("conformance/dshal_conformance/**/*.py"),
               *root.glob("plugins/*/dshal_*/**/*.py")]
    read = {name for path in sources for name in re.findall(r"\bDSHAL_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8"))}
    assert "DSHAL_CONFIG" in read and len(sources) > 50  # the scan found the code
    assert sorted(read - internal - set(re.findall(r"^  (DSHAL_[A-Z0-9_]+)", EPILOG, flags=re.M))) == []


@pytest.mark.parametrize("command", ["run", "profile", "bench --backend cpu", "conformance --backend cpu"])
def test_a_flag_that_does_not_parse_gets_the_commands_usage(command, capsys):
    """argparse's errors (exit 2) show the command's own usage: an unknown flag printed the
    top-level `dshal COMMAND ...` usage; a --seed past what torch takes was a traceback."""
    from dshal.cli import main

    command, *required = command.split()
    for argv, said in (([command, *required, "--bogus", "x"], "unrecognized arguments: --bogus x"),
                       ([command, *required, "--seed", str(2**64)], f"argument --seed: got {2**64}, expected an integer in [0, 2**63 - 1]"),
                       ([command, *required, "--seed", "-1"], "argument --seed: got -1, expected"),
                       ([command, *required, "--seed", "0x10"], "argument --seed: got '0x10', expected an integer in [0, 2**63 - 1]")):  # fmt: skip
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err
        assert caught.value.code == 2 and f"usage: dshal {command} " in err and f"dshal {command}: error: {said}" in err


def test_a_mistyped_command_or_flag_is_answered_with_the_close_one(capsys):
    """A typo got argparse's bare refusal; a command's own flag given before the command
    (``dshal --json info``) was refused as unknown by `dshal info`, which lists it in its --help."""
    from dshal.cli import main

    for argv, said in ((["infp"], "dshal: error: argument COMMAND: invalid choice: 'infp'; did you mean 'info'?"),
                       (["info", "--jsn"], "dshal info: error: unrecognized arguments: --jsn; did you mean --json?"),
                       (["run", "--new-tokns=3"], "dshal run: error: unrecognized arguments: --new-tokns=3; did you mean --new-tokens?"),
                       (["run", "--bogus"], "dshal run: error: unrecognized arguments: --bogus\n"),  # not "did you mean --verbose?"
                       (["--json", "info"], "dshal info: error: unrecognized arguments: --json; --json is an option of "
                                            "`dshal info`: give it after the command"),
                       (["info", "--zzzzz"], "dshal info: error: unrecognized arguments: --zzzzz\n")):  # fmt: skip
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err
        assert caught.value.code == 2 and said in err, (argv, err)


def test_no_command_is_a_usage_error_on_stderr(capsys):
    """`dshal` alone exits 2, a usage error, but printed its help on stdout (`dshal > out` hid it)."""
    from dshal.cli import main

    assert main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("usage: dshal ") and "exit status:" in out.err


def test_dshal_error_is_one_clean_line_and_exit_1():
    out = run("info", extra_env={"DSHAL_BACKEND": "nope"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dshal info: error: backend 'nope' is not installed; installed: [")


def test_config_error_escaping_a_command_is_one_line(monkeypatch, capsys):
    from dshal.cli import main

    monkeypatch.setenv("DSHAL_EMULATE", "maybe")
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "dshal info: error: environment variable DSHAL_EMULATE: got 'maybe', expected 1 or 0 (true/false, yes/no, on/off)\n"
    )


def test_a_command_named_in_its_own_message_is_named_once(capsys):
    from dshal.cli import main

    assert main(["run", "--new-tokens", "-1"]) == 1
    assert capsys.readouterr().err == "dshal run: error: --new-tokens is -1, expected an integer >= 1\n"


def test_python_dash_m():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    out = subprocess.run([sys.executable, "-m", "dshal", "info", "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runtime"]["selection"][-1]["taken"]


def test_info_survives_plugins_with_bad_capabilities_and_prints(install_plugin):
    """A plugin whose capabilities() is not a Capabilities (a dict, None, fields the core
    cannot act on) is listed as failed, and `dshal info` still lists the others: a dict was a
    TypeError traceback for every plugin. A plugin printing on import or in availability()
    leaves `--json` parseable (its lines go to stderr)."""
    install_plugin("backends", {"capsdict": "CapabilitiesDictBackend", "capsnone": "CapabilitiesNoneBackend",
                                "capsclaims": "CapabilitiesClaimsBackend", "availbool": "AvailabilityBoolBackend"})
    install_plugin("prints_on_import", {"chatty": "ChattyBackend"})
    path = {"PYTHONPATH": os.pathsep.join(sys.path[:2])}  # the two throw-away distributions' folders
    out = run("info", "--json", extra_env=path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # the chatty plugin's prints went to stderr
    assert "acme runtime 1.2 loaded" in out.stderr and "probing acme devices" in out.stderr
    infos = {b["name"]: b for b in data["backends"]}
    assert infos["chatty"]["available"] and infos["cpu"]["available"]
    assert "capabilities() must return dshal.Capabilities, got dict" in infos["capsdict"]["reason"]
    assert "capabilities() must return dshal.Capabilities, got NoneType" in infos["capsnone"]["reason"]
    claims = infos["capsclaims"]["reason"]
    assert "fp8_formats is 'e4m3fn', expected a tuple of e4m3fn, e4m3fnuz, e5m2" in claims
    assert "op_kinds names 'attention', which ops() does not provide" in claims
    assert "op_kinds['rms_norm'] is 'fast', expected one of native, triton, emulated, reference" in claims
    assert "notes is {'driver': 'int', 'runtime': 'str'}, expected a mapping of str to str" in claims
    assert "arch is None, expected a str" in claims
    assert not any(infos[n]["loaded"] for n in ("capsdict", "capsnone", "capsclaims"))
    assert infos["availbool"]["reason"] == "availability() must return dshal.Availability, got bool"  # not "raised"
    table = run("info", extra_env=path)
    assert table.returncode == 0 and "Traceback" not in table.stderr and "chatty-device" in table.stdout


def test_a_closed_pipe_ends_the_command_without_a_traceback():
    """``dshal run --interactive ... | head``: the reader left and the next print raised a
    BrokenPipeError traceback; now the command ends quietly with 141 (128 + SIGPIPE)."""
    script = (
        "import os, sys\n"
        "from dshal.cli import main\n"
        "r, w = os.pipe()\n"
        "os.close(r)\n"
        "os.dup2(w, sys.stdout.fileno())\n"
        "sys.exit(main(['info', '--json', '--backend', 'cpu']))\n"
    )
    # Buffered, as in a pipeline: PYTHONUNBUFFERED (set on some machines) hid the failure at exit.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED" and not k.startswith("DSHAL_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 141, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    # Tables go through rich, whose own handler exited 1 with no word: a `pipefail` shell could
    # not tell `dshal info | head -1` from a failure.
    for argv in (["info", "--backend", "cpu"], ["run", "--no-progress", "--new-tokens", "2", "--prompt-len", "2"]):
        table = subprocess.run([sys.executable, "-c", script.replace("['info', '--json', '--backend', 'cpu']", repr(argv))],
                               capture_output=True, text=True, timeout=120, check=False, env=env)
        assert table.returncode == 141, (argv, table.stderr[-2000:])
        assert "Traceback" not in table.stderr, argv


def test_commands_print_through_closed_or_narrow_streams(tmp_path):
    """`dshal info >&-` (no stdout at all) crashed on sys.stdout.isatty(); under
    PYTHONIOENCODING=ascii a non-ASCII report path crashed `dshal run` after its work was done
    (UnicodeEncodeError): such characters are printed escaped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    closed = subprocess.run([sys.executable, "-m", "dshal", "info", "--backend", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=120, env=env, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr[-2000:]
    report = tmp_path / "répört×.html"
    narrow = subprocess.run([sys.executable, "-m", "dshal", "run", "--no-progress", "--new-tokens", "2", "--prompt-len", "2",
                             "--report", str(report)], capture_output=True, timeout=120, env={**env, "PYTHONIOENCODING": "ascii"})
    out = narrow.stdout.decode("ascii")  # ASCII only
    assert narrow.returncode == 0, narrow.stderr.decode(errors="replace")[-2000:]
    assert "run report: " in out and "r\\xe9p\\xf6rt\\xd7.html" in out and report.exists()


def test_no_writable_temporary_folder_is_one_line():
    """A read-only root with no writable /tmp (Kubernetes): `dshal plan` died in torch's
    dynamo import with tempfile's traceback. The environment is made here by limiting the
    folders tempfile tries to one that does not exist, in the child only."""
    script = (
        "import sys, tempfile\n"
        "tempfile.tempdir = None\n"
        "tempfile._candidate_tempdir_list = lambda: ['/nonexistent/dshal-test']\n"
        "from dshal.cli import main\n"
        "sys.exit(main(['plan', '--no-progress']))\n"
    )
    # torch sets TORCHINDUCTOR_CACHE_DIR in its own process when dynamo is imported (an earlier
    # test's, here), and with it set the child never asks tempfile
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TMPDIR")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "dshal plan: error: no writable temporary folder (" in done.stderr and "set TMPDIR to one" in done.stderr
    assert "Traceback" not in done.stderr


def test_verbose_says_on_stderr_which_plugins_auto_passed_over_and_stdout_stays_json(monkeypatch, capsys, tmp_path):
    """Without -v / DSHAL_LOG, why ``backend: auto`` passed a plugin over (it failed to load,
    no device) and who serves each op reached no one outside ``dshal info``: the ``dshal``
    logger's info and debug records had no handler. The flag, before or after the command, or
    DSHAL_LOG, writes them on stderr; stdout keeps its format."""
    import logging

    from dshal.cli import main
    from dshal.registry import REGISTRY

    for name in [k for k in os.environ if k.startswith("DSHAL_")]:
        monkeypatch.delenv(name)
    (tmp_path / "dshal.yaml").write_text("backend: auto\nprefer: [nope, cpu]\n")  # auto passes over nope: not installed
    monkeypatch.setenv("DSHAL_CONFIG", str(tmp_path / "dshal.yaml"))
    logger = logging.getLogger("dshal")
    handlers_before, level_before = list(logger.handlers), logger.level

    assert main(["info", "--json"]) == 0
    quiet = capsys.readouterr()
    assert "passed over" not in quiet.err

    for argv, env in ((["-v", "info", "--json"], None), (["info", "--json", "-v"], None), (["info", "--json"], "INFO")):
        if env is not None:
            monkeypatch.setenv("DSHAL_LOG", env)
        assert main(argv) == 0
        said = capsys.readouterr()
        json.loads(said.out)
        assert "dshal: backend: auto passed over 'nope': not installed" in said.err, (argv, said.err)
        assert "op providers:" not in said.err  # debug only
    monkeypatch.delenv("DSHAL_LOG")

    REGISTRY.refresh()  # discovery, and its debug lines, happen once per process
    assert main(["-v", "info", "-v", "--json"]) == 0  # -v before and after the command add up
    said = capsys.readouterr().err
    assert "dshal: op providers: " in said and "rms_norm: cpu" in said
    assert "dshal: plugin 'cpu' (dshal.backends.cpu:CpuBackend): loaded True, available True" in said
    # The command's handler and level are undone: a program calling main() keeps its logging.
    assert (logger.handlers, logger.level, logger.propagate) == (handlers_before, level_before, True)


def test_verbose_in_a_program_with_its_own_logging_prints_each_record_once(monkeypatch, capsys):
    """`logging.basicConfig()` then `main(["-v", ...])` in-process: the record went to the
    command's handler and, propagated, to the program's root handler too."""
    import logging

    from dshal.cli import main

    for name in [k for k in os.environ if k.startswith("DSHAL_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    program = logging.StreamHandler(sys.stderr)
    program.setFormatter(logging.Formatter("program: %(message)s"))
    root.addHandler(program)
    try:
        monkeypatch.setenv("DSHAL_LOG", "info")
        assert main(["info", "--json"]) == 0
    finally:
        root.removeHandler(program)
    said = capsys.readouterr().err
    assert said.count("dshal: backend: auto passed over") >= 1 and "program: dshal:" not in said, said


def test_a_bad_dshal_log_is_one_line_naming_it(monkeypatch, capsys):
    from dshal.cli import main

    monkeypatch.setenv("DSHAL_LOG", "loud")
    assert main(["info", "--json"]) == 1
    assert capsys.readouterr().err == (
        "dshal info: error: environment variable DSHAL_LOG is 'loud', expected one of debug, info, warning, error\n")


def test_importing_and_using_dshal_as_a_library_configures_no_logging_and_prints_nothing():
    """A library leaves logging to the program: no handler on the root or ``dshal`` logger, no
    root level, nothing on stdout / stderr, every module logging under ``dshal``."""
    code = (
        "import logging, dshal, dshal.model, dshal.plugin\n"
        "rt = dshal.use(backend='cpu')\n"
        "names = sorted(n for n in logging.root.manager.loggerDict if 'dshal' in n)\n"
        "assert all(n == 'dshal' or n.startswith(('dshal.', 'dshal_conformance.')) for n in names), names\n"
        "assert 'dshal.runtime' in names and 'dshal.registry' in names, names\n"
        "assert logging.getLogger().handlers == [] and logging.getLogger().level == logging.WARNING\n"
        "assert all(logging.getLogger(n).handlers == [] for n in names), names\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def _stderr_at_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m dshal ARGS`` with stderr a pseudo-terminal (stdout discarded): its exit
    status and what it wrote to stderr."""
    pty = pytest.importorskip("pty")
    main_end, child_end = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dshal", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=child_end, env=env)
    os.close(child_end)
    said = b""
    while True:
        try:
            chunk = os.read(main_end, 4096)
        except OSError:  # EIO: the child's end closed (Linux)
            break
        if not chunk:
            break
        said += chunk
    os.close(main_end)
    return proc.wait(timeout=120), said.decode(errors="replace").replace("\r\n", "\n")


def test_the_first_runs_c_kernel_build_is_said_in_one_line_at_a_terminal(tmp_path):
    """The first command that selects the cpu backend compiles its C kernels (seconds under load,
    before any output): at a terminal it says so, once; a later run and a pipe stay quiet."""
    from dshal.kernels import cpu as cpu_kernels

    if not cpu_kernels.status().available:
        pytest.skip(f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env.update(DSHAL_CACHE_DIR=str(tmp_path / "cache"), DSHAL_BACKEND="cpu")
    code, said = _stderr_at_a_terminal(["info", "--json"], env)
    assert code == 0, said
    folder = tmp_path / "cache" / "cpu-kernels"
    assert said == f"dshal: compiling the cpu backend's C kernels for this CPU into {folder} (first use only)\n"
    assert _stderr_at_a_terminal(["info", "--json"], env) == (0, "")  # built: loaded in silence
    env["DSHAL_CACHE_DIR"] = str(tmp_path / "piped")
    piped = subprocess.run([sys.executable, "-m", "dshal", "info", "--json"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert (piped.returncode, piped.stderr) == (0, "")  # logs and CI output keep their default
    assert list((tmp_path / "piped" / "cpu-kernels").glob("dshal_cpu_*.so"))  # it did build there
