"""Outputs: the JSON report (schema ``dshal.conformance/1``), JUnit XML and the submission bundle."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shlex
import tarfile
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import dshal
from dshal.config import read_text_file
from dshal.errors import ArgumentError, DshalError
from dshal.outputs import atomic_output, atomic_write
from dshal.redact import shareable
from dshal_conformance import __version__

SCHEMA_ID = "dshal.conformance/1"


class ReportError(DshalError, ValueError):
    """A file given as a conformance report cannot be used: missing, unreadable, not UTF-8,
    not JSON, another schema, or not valid against ``dshal.conformance/1``."""

_SUMMARY_KEY = {"pass": "passed", "fail": "failed", "skip": "skipped", "unsupported": "unsupported", "error": "errors"}


def schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package."""
    return json.loads(resources.files("dshal_conformance").joinpath("schema/conformance-1.schema.json").read_text())


def validate(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``report`` does not follow the schema.
    Without jsonschema installed (the offline GPU machine of ``benchmarks/gpu_check.py``
    carries only pure-Python wheels, and jsonschema needs the binary rpds-py) the report is
    written unvalidated, with a warning."""
    try:
        import jsonschema
    except ImportError:
        import warnings

        warnings.warn("jsonschema is not installed: the conformance report is not validated against its schema", stacklevel=2)
        return
    jsonschema.validate(report, schema())


def summarize(cases: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(_SUMMARY_KEY.values(), 0)
    for c in cases:
        counts[_SUMMARY_KEY[c["status"]]] += 1
    return counts


def build(
    target: Any, options: Any, records: list[dict[str, Any]], started: datetime, duration_s: float, versions: dict[str, Any]
) -> dict[str, Any]:
    """The report; ``versions``: triton, driver, runtime, python, host (the runner's ``versions(target)``)."""
    import torch  # here, not at the top: `dshal matrix` reads reports without torch

    platform: dict[str, Any] = {"device": "not run", "arch": "", "torch": torch.__version__, "emulated": False,
                                "triton": None, "driver": None, "runtime": None}  # required: null until versions says
    if target.runtime is not None:
        caps = target.runtime.capabilities
        platform.update(device=caps.device_name, arch=caps.arch, emulated=target.emulated)
    else:
        platform["not_run"] = target.not_run or "not run"
        if target.broken_leg:  # installed and crashed, or a typo: a failed leg, not a missing one
            platform["broken"] = target.broken_leg
    platform.update(versions)  # triton, driver, runtime, python, host
    if getattr(options, "leg", None):
        platform["leg"] = options.leg
    return {
        "schema": SCHEMA_ID,
        "backend": target.name,
        "plugin_version": target.plugin_version,
        "dshal_version": dshal.__version__,
        "platform": platform,
        "seed": options.seed,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 3),
        "summary": summarize(records),
        "cases": records,
        "tier": options.tier,
        "suite_version": __version__,
        "selection": {  # sorted: `--ops a,b` and `--ops b,a` check the same cases, one leg of the matrix
            "ops": sorted(set(options.ops)) if options.ops is not None else None,
            "cases": sorted(set(options.cases)) if options.cases is not None else None,
            "collectives": bool(options.collectives),
        },
        "waivers": [w.as_dict() for w in options.waivers],
        # what decides a case's verdict besides its code: a rerun of one case gives them again
        "judging": {
            "waivers_file": options.waivers_file,
            "determinism": target.runtime.config.determinism if target.runtime is not None else None,
            "case_timeout_s": options.case_timeout_s,
        },
    }


def ok(report: dict[str, Any]) -> bool:
    """True when nothing failed or errored (skips and unsupported ops do not fail a run), and
    something was checked: a run whose every case was skipped (waived, or too few devices)
    checked nothing, and nothing to check is not a pass."""
    s = report["summary"]
    return s["failed"] == 0 and s["errors"] == 0 and not all_skipped(report)


def all_skipped(report: dict[str, Any]) -> bool:
    """Cases ran (or were selected) and every one of them was skipped."""
    return bool(report["cases"]) and all(c["status"] == "skip" for c in report["cases"])


def write_json(report: dict[str, Any], path: Path) -> Path:
    """The report as strict JSON: a NaN or infinite number anywhere in it (a case's value or
    details) is written as null, not as ``NaN`` / ``Infinity``, which JSON parsers other than
    Python's refuse (the case's reason keeps the word). Its text is
    :func:`~dshal.redact.shareable`: no secret of the environment, no home folder."""
    data = shareable(finite_numbers(report))
    return atomic_write(path, json.dumps(data, indent=1, sort_keys=False, allow_nan=False) + "\n")


def finite_numbers(value: Any) -> Any:
    """``value`` with every NaN / infinite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_numbers(v) for v in value]
    return value


#: Characters XML 1.0 cannot hold, even escaped (C0 controls but tab, newline, carriage return;
#: lone surrogates; U+FFFE, U+FFFF): a CUDA error's ANSI colour codes made the JUnit file unreadable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(value: Any) -> str:
    """``str(value)`` with the characters XML cannot hold written as ``\\x1b`` escapes."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        str(value))


def write_junit(report: dict[str, Any], path: Path) -> Path:
    """JUnit XML: one testcase per result; fail -> <failure>, error -> <error>, skip and
    unsupported -> <skipped> (with the reason). Every text goes through :func:`xml_text`.
    A report naming its CI leg names its suite and classes ``BACKEND@LEG``: the h100 and h200
    legs both run ``nvidia``, and dashboards reading both files merge suites of one name
    (Jenkins) or keep only the first of equal classname + name (GitLab). A case a waiver
    touched says so in its <system-out>, since a loosened threshold's pass is otherwise a
    plain pass; a failure's body ends with the command that reruns the case. Its text is
    :func:`~dshal.redact.shareable`, as the JSON report's."""
    report = shareable(report)
    s = report["summary"]
    leg = report["platform"].get("leg")
    label = f"{report['backend']}@{leg}" if leg else report["backend"]
    not_run = "not_run" in report["platform"]  # one testcase of its own: an error when the leg is broken
    broken = not_run and bool(report["platform"].get("broken"))

    def element(parent: ET.Element | None, tag: str, text: str | None = None, **attrs: Any) -> ET.Element:
        clean = {k: xml_text(v) for k, v in attrs.items()}
        node = ET.Element(tag, clean) if parent is None else ET.SubElement(parent, tag, clean)
        if text is not None:
            node.text = xml_text(text)
        return node

    suite = element(
        None,
        "testsuite",
        name=f"dshal-conformance.{label}",
        tests=len(report["cases"]) + not_run,
        failures=s["failed"],
        errors=s["errors"] + broken,
        skipped=s["skipped"] + s["unsupported"] + (not_run and not broken),
        time=f"{report['duration_s']:.3f}",
        timestamp=report["started"],
    )
    props = element(suite, "properties")
    facts = [(key, report.get(key)) for key in ("backend", "plugin_version", "dshal_version", "seed", "tier")]
    for key, value in facts + [(f"platform.{key}", value) for key, value in report["platform"].items()]:
        # As the JSON report says them (null, false), not Python's None / False.
        element(props, "property", name=key, value=value if isinstance(value, str) else json.dumps(value))
    if not_run:
        case = element(suite, "testcase", classname=label, name="not-run", time="0")
        if broken:  # dashboards must show a broken plugin as broken, not as a skipped leg
            element(case, "error", report["platform"]["not_run"],
                    message=f"{report['platform']['broken']}: {report['platform']['not_run']}"[:500])
        else:
            element(case, "skipped", message=report["platform"]["not_run"])
    for c in report["cases"]:
        case = element(suite, "testcase", classname=f"{label}.{c['op']}", name=c["id"],
                       time=f"{c.get('duration_s', 0):.4f}")
        measured = f"{c['metric']}={c['value']} threshold={c['threshold']}: " if c["metric"] else ""
        message = measured + c["reason"]
        if c["status"] in ("fail", "error"):
            element(case, "failure" if c["status"] == "fail" else "error",
                    f"{c['reason']}\n\nrerun: {_rerun_command(report, c['id'])}", message=message[:500])
        elif c["status"] in ("skip", "unsupported"):
            element(case, "skipped", message=f"{c['status']}: {c['reason']}"[:500])
        if c.get("waivers"):
            element(case, "system-out", "".join(f"waived: {reason}\n" for reason in c["waivers"]))
    return atomic_write(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))


def _rerun_command(report: dict[str, Any], case_id: str) -> str:
    """``dshal conformance`` rerunning one case of ``report`` as it ran and judging it as the run
    did (backend, seed, tier, emulation; the run's waivers file, determinism mode and per-case
    timeout, where the report records them)."""
    extra = (" --tier full" if report.get("tier") == "full" else "") + (" --emulate" if report["platform"].get("emulated") else "")
    judging = report.get("judging") or {}
    if judging.get("waivers_file"):
        extra += f" --waivers {_shell_path(judging['waivers_file'])}"
    if judging.get("determinism") == "strict":  # a determinism case then fails rather than reports a finding
        extra += " --determinism strict"
    if judging.get("case_timeout_s") is not None:  # a slow case errors past it
        extra += f" --timeout {judging['case_timeout_s']:g}"
    return f"dshal conformance --backend {report['backend']} --case '{case_id}' --seed {report['seed']}{extra}"


def _shell_path(path: str) -> str:
    """``path`` quoted for a shell, a leading ``~/`` (a shareable report's home folder) left
    unquoted so that the shell expands it."""
    home, rest = ("~/", path[2:]) if path.startswith("~/") else ("", path)
    return home + shlex.quote(rest)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_archive(out_dir: Path) -> Path:
    """The archive :func:`write_bundle` packs ``out_dir`` into: ``<folder>.tar.gz`` beside it.
    ``.`` and ``..`` are named by the folders they are (``--bundle .`` was a ValueError after
    the whole run; ``..`` packed the parent as ``...tar.gz`` here)."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".."):
        out_dir = Path(os.path.abspath(out_dir))
    if not out_dir.name:
        raise ArgumentError(f"--bundle: got {str(out_dir)!r}, expected a folder with a name (its archive, "
                            "<folder>.tar.gz, is written beside it)")
    return out_dir.with_name(out_dir.name + ".tar.gz")


def write_bundle(report: dict[str, Any], environment: dict[str, Any], files: list[Path], out_dir: Path) -> Path:
    """A submission bundle: the report files, ``environment.json`` and ``SHA256SUMS``
    (``sha256sum -c SHA256SUMS`` checks it), packed as ``<dir>.tar.gz`` too, written like
    every report file through a temporary file and a rename (never a partial archive).

    The archive is a function of its files alone (:func:`_pack`): the same report gives the same
    bytes, whoever packs it, whenever, under whatever umask."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in files:
        dest = out_dir / f.name
        if f.resolve() != dest.resolve():
            atomic_write(dest, f.read_bytes())
        copied.append(dest)
    env_path = out_dir / ENVIRONMENT_FILE
    env_text = json.dumps(shareable({"schema": ENVIRONMENT_SCHEMA, **environment}), indent=1, default=str)
    atomic_write(env_path, env_text + "\n")
    copied.append(env_path)
    copied.sort(key=lambda p: p.name)
    lines = [f"{sha256(p)}  {p.name}" for p in copied]
    sums = out_dir / "SHA256SUMS"
    atomic_write(sums, "\n".join(lines) + "\n")
    archive = bundle_archive(out_dir)
    # This run's files only: a reused folder may hold an earlier run's (a failure mid-way
    # leaves the previous archive, or none).
    _pack(archive, archive.name.removesuffix(".tar.gz"), [*copied, sums], _bundle_time(report))
    return archive


def _bundle_time(report: dict[str, Any]) -> int:
    """The time the bundle's members carry: the report's ``started`` (already in its content,
    so it adds nothing that varies), else 0."""
    try:
        return max(0, int(datetime.fromisoformat(str(report["started"])).timestamp()))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return 0


def _pack(archive: Path, top: str, paths: list[Path], mtime: int) -> None:
    """``paths`` as ``top/<name>`` in a reproducible ``.tar.gz``: members in name order, each
    with ``mtime``, mode 0644, owner 0:0 and no owner names (the packer's login is nobody's
    business), and a gzip header with no time and no file name (gzip's own header would say
    when and as which temporary file it was written)."""

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.mode = mtime, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with atomic_output(archive) as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(paths, key=lambda p: p.name):
                tar.add(path, arcname=f"{top}/{path.name}", recursive=False, filter=normalized)


#: A bundle's environment file, and the schema it declares so that `dshal matrix` given
#: ``reports/*/*.json`` over a bundle folder can tell it from a report.
ENVIRONMENT_FILE = "environment.json"
ENVIRONMENT_SCHEMA = "dshal.environment/1"


def is_environment_file(path: str | Path) -> bool:
    """``path`` is a bundle's environment file (this version's, or an older one's without a
    schema), not a report."""
    path = Path(path)
    if path.name != ENVIRONMENT_FILE:
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, or nested past the decoder's limit
        return False
    return isinstance(data, dict) and (
        data.get("schema") == ENVIRONMENT_SCHEMA or ("schema" not in data and "cases" not in data and "suite_version" in data)
    )


#: Platform facts earlier suites did not record (each reads as unknown: null).
_LATER_PLATFORM_FACTS = ("triton", "driver", "runtime")
#: The case kind an id's first part names (``comm/all_reduce/w2``); an op's cases name theirs
#: second (``rms_norm/bad_input/...``), else they are accuracy or edge cases (read as accuracy).
_KIND_OF_PREFIX = {"capability": "capability", "model": "model", "determinism": "determinism", "graph": "graph",
                   "hooks": "hooks", "comm": "collective"}


def _kind_of(case_id: str) -> str:
    first, _, rest = case_id.partition("/")
    return _KIND_OF_PREFIX.get(first) or ("bad_input" if rest.split("/")[0] == "bad_input" else "accuracy")


def as_current_revision(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``dshal.conformance/1`` report as this suite's schema reads it, so a matrix can mix
    legs run by different suite versions, and what was changed to read it: facts an earlier
    suite did not record are filled as unknown (platform ``triton`` / ``driver`` / ``runtime``:
    null; a case's ``kind`` from its id), and keys a later suite added, which this schema does
    not know, are left out (named: a typo in a hand-edited report is left out the same way).
    A copy."""
    known, notes = schema(), []
    out = {k: v for k, v in report.items() if k in known["properties"]}
    ignored = sorted(set(report) - set(out))
    platform = report.get("platform")
    if isinstance(platform, dict):
        facts = known["properties"]["platform"]["properties"]
        ignored += [f"platform.{k}" for k in sorted(set(platform) - set(facts))]
        unrecorded = [k for k in _LATER_PLATFORM_FACTS if k not in platform]
        if unrecorded:
            notes.append(f"written by an earlier suite: platform {', '.join(unrecorded)} not recorded (read as unknown)")
        out["platform"] = {**dict.fromkeys(unrecorded), **{k: v for k, v in platform.items() if k in facts}}
    cases = report.get("cases")
    if isinstance(cases, list):
        fields = known["properties"]["cases"]["items"]["properties"]
        out["cases"], kinds_read = [], 0
        for case in cases:
            if isinstance(case, dict):
                ignored += [f"cases[].{k}" for k in set(case) - set(fields)]
                kept = {k: v for k, v in case.items() if k in fields}
                if "kind" not in case:
                    kept["kind"], kinds_read = _kind_of(str(case.get("id", ""))), kinds_read + 1
                case = kept
            out["cases"].append(case)
        if kinds_read:
            notes.append(f"written by an earlier suite: the kind of {kinds_read} case(s) read from their ids")
    if ignored:
        notes.append(f"keys this suite does not know (a later suite's, or a typo) left out: {', '.join(sorted(set(ignored)))}")
    return out, notes


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a report (matrix input), as this suite's revision of the schema reads
    it (:func:`as_current_revision`: an earlier or later suite's report still merges); every
    problem is a ReportError naming the file and what is wrong with it."""
    import jsonschema


    try:
        _, text = read_text_file(path, "conformance report")
    except DshalError as err:
        raise ReportError(str(err)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        raise ReportError(f"{path}: JSON nested too deeply to read (not a conformance report)") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: a JSON {type(data).__name__}, expected a conformance report object")
    if data.get("schema") != SCHEMA_ID:
        raise ReportError(f"{path}: schema is {data.get('schema')!r}, expected {SCHEMA_ID!r} (a dshal conformance report)")
    data, notes = as_current_revision(data)
    try:
        validate(data)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ReportError(f"{path}: does not follow {SCHEMA_ID} at {where}: {err.message[:200]}") from None
    try:  # the matrix orders reruns and ages legs by it
        datetime.fromisoformat(data["started"])
    except ValueError:
        raise ReportError(f"{path}: started is {data['started']!r}, expected an ISO 8601 time "
                          "(2026-12-06T19:04:33+00:00)") from None
    data["_read_notes"] = notes  # what reading it changed (the matrix says it)
    return data
