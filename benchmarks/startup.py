"""How long do ``dshal`` commands and ``import dshal`` take to start, next to ``import torch``?

Runs each case in a fresh interpreter, the cases taking turns within each round (load on the
machine hits them all alike), after one untimed round that warms the OS file cache and writes
the project's ``.pyc`` files. Per case it prints the median and range of the wall time, the
ratio to the peer baseline ``python -c "import torch"`` measured in the same run, the modules
loaded at exit and which of the heavy ones among them. ``dshal run`` is timed twice: with its
C kernels already built (a warm cache) and with an empty ``DSHAL_CACHE_DIR`` each time (a
user's first run, which compiles them). ``--compare DIR`` also times each dshal case from
another tree of this repository (``git archive`` of an older commit, say), in the same rounds.

    python benchmarks/startup.py [--repeat 5] [--quick] [--compare DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Modules whose presence at exit is worth a line: each costs a visible share of a start-up.
HEAVY = ("torch", "torch._dynamo", "triton", "transformers", "sympy", "rich", "stevedore", "yaml",
         "dshal.registry", "dshal.model", "dshal.kernels.cpu._library", "dshal_conformance")

#: Runs one case, then writes the modules loaded at exit to the file named by argv[1]. A case
#: is Python source (``code:...``) or the ``dshal`` command's arguments (what the console
#: script does: ``sys.exit(dshal.cli.main())``).
CHILD = """\
import atexit, json, sys
out, case = sys.argv[1], json.loads(sys.argv[2])
heavy = json.loads(sys.argv[3])
def report():
    with open(out, "w") as f:
        json.dump({"modules": len(sys.modules), "heavy": [m for m in heavy if m in sys.modules]}, f)
atexit.register(report)
if isinstance(case, str):
    exec(compile(case, "<case>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = ["dshal", *case]
    from dshal.cli import main
    sys.exit(main())
"""


@dataclass
class Case:
    name: str
    #: Python source, or the ``dshal`` command's arguments
    what: str | list[str]
    #: an empty DSHAL_CACHE_DIR for every run (the first run's C kernel build)
    fresh_cache: bool = False
    peer: bool = False
    #: the tree of the repository dshal is imported from (--compare: another one)
    tree: Path = REPO
    seconds: list[float] = field(default_factory=list)
    loaded: dict = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    out = [Case("python -c 'import torch' (peer)", "import torch", peer=True)]
    if importlib.util.find_spec("transformers") is not None:
        out.append(Case("python -c 'import transformers' (peer)", "import transformers", peer=True))
    out += [
        Case("python -c 'import dshal'", "import dshal"),
        Case("python -c 'import dshal; dshal.use()'", "import dshal; dshal.use()"),
        Case("dshal --help", ["--help"]),
        Case("dshal inf (a mistyped command)", ["inf"]),
        Case("dshal info --help", ["info", "--help"]),
        Case("dshal plan --help", ["plan", "--help"]),
        Case("dshal run --help", ["run", "--help"]),
        Case("dshal info", ["info"]),
    ]
    if not quick:
        out += [
            Case("dshal run (C kernels built)", ["run", "--no-progress"]),
            Case("dshal run (first run: empty cache)", ["run", "--no-progress"], fresh_cache=True),
            Case("dshal plan (DeepSeek-V3, one rank)", ["plan", "--no-progress"]),
        ]
    return out


def run_case(case: Case, env: dict[str, str], cache: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dshal-startup-") as scratch:
        out = Path(scratch) / "loaded.json"
        env = {**env, "DSHAL_CACHE_DIR": str(Path(scratch) / "cache") if case.fresh_cache else cache}
        # The tree's packages first (the repository's layout: conformance/, plugins/*/), run from a
        # scratch folder: the current one would come first on sys.path.
        roots = [case.tree, case.tree / "conformance", *sorted(case.tree.glob("plugins/*"))]
        env["PYTHONPATH"] = os.pathsep.join([*map(str, roots), env.get("PYTHONPATH", "")])
        argv = [sys.executable, "-c", CHILD, str(out), json.dumps(case.what), json.dumps(HEAVY)]
        started = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=scratch, timeout=600)
        case.seconds.append(time.perf_counter() - started)
        if done.returncode not in (0, 2):  # 2: a usage error, what the mistyped command is
            raise SystemExit(f"{case.name}: exit {done.returncode}\n{done.stderr[-2000:]}")
        case.loaded = json.loads(out.read_text())


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch_version}, Python {sys.version.split()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="leave out dshal run and dshal plan (seconds each)")
    parser.add_argument("--compare", type=Path, metavar="DIR", help="also time the dshal cases from this tree")
    args = parser.parse_args()
    # The user's environment less dshal's own settings; .pyc files written, as an installed package has them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k != "PYTHONDONTWRITEBYTECODE"}
    todo = cases(args.quick)
    if args.compare is not None:
        tree = args.compare.resolve()
        todo += [Case(f"{c.name} [{tree.name}]", c.what, c.fresh_cache, tree=tree) for c in todo if not c.peer]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dshal-startup-cache-") as cache:
        for case in todo:  # untimed: file cache, .pyc files, the warm cache's C kernels
            run_case(case, env, cache)
            case.seconds.clear()
        for _ in range(args.repeat):
            for case in todo:
                run_case(case, env, cache)
    load_after = os.getloadavg()
    torch_s = statistics.median(todo[0].seconds)
    print(f"machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"median of {args.repeat} runs each, the cases taking turns; ratio: to `import torch` in this run\n")
    print("| case | median | min – max | × import torch | modules at exit | heavy modules loaded |")
    print("|---|---|---|---|---|---|")
    for case in todo:
        median = statistics.median(case.seconds)
        heavy = ", ".join(case.loaded["heavy"]) or "none"
        print(f"| {case.name} | {median:.2f} s | {min(case.seconds):.2f} – {max(case.seconds):.2f} s | "
              f"{median / torch_s:.2f} | {case.loaded['modules']} | {heavy} |")


if __name__ == "__main__":
    main()
