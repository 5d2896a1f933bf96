"""What report files say about the machine that wrote them (``dshal.redact``): no secret of the
environment, no home folder, source files named as their modules are imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dshal.redact import code_path, shareable, shareable_text

SECRET = "s3cr3t-V4lue-0123456789"
HF = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7"  # the shape of a Hugging Face token, not one


def _environ(home: str = "/home/jdoe") -> dict[str, str]:
    return {"HOME": home, "MY_SERVICE_API_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
            "DB_PASSWORD": "hunter2-but-longer", "SHORT_TOKEN": "1", "PATH": "/usr/bin", "LANG": "C.UTF-8"}


def test_secret_environment_values_are_redacted_wherever_they_appear() -> None:
    env = _environ()
    text = (f"login with {SECRET} failed; key wJalrXUtnFEMI/K7MDENG; db hunter2-but-longer; "
            f"run 1 of 1 on /usr/bin; {HF}")
    out = shareable_text(text, env)
    for leaked in (SECRET, "wJalrXUtnFEMI/K7MDENG", "hunter2-but-longer", HF):
        assert leaked not in out, out
    assert "[redacted MY_SERVICE_API_TOKEN]" in out and "[redacted AWS_SECRET_ACCESS_KEY]" in out
    # a short value (SHORT_TOKEN=1) and variables with no secret in their name are left alone
    assert "run 1 of 1 on /usr/bin" in out


@pytest.mark.parametrize("text, kept, gone", [
    ("fetch https://ci-bot:pa55w0rd@artifacts.example.com/x failed", "https://ci-bot:***@artifacts.example.com/x", "pa55w0rd"),
    ("GET /v1/x?user=a&access_token=abcdef123456&n=2", "?user=a&access_token=***&n=2", "abcdef123456"),
    ("header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30", "Bearer ***", "eyJhbGci"),
    ("no credential here: https://example.com/a:b@c", "no credential here", None),
])
def test_credentials_in_urls_and_headers_are_redacted(text: str, kept: str, gone: str | None) -> None:
    out = shareable_text(text, {})
    assert kept in out, out
    if gone is not None:
        assert gone not in out, out


def test_the_home_folder_is_written_as_tilde_and_only_at_a_path_boundary() -> None:
    env = _environ("/home/jdoe")
    out = shareable_text("ckpt /home/jdoe/models/v3 and /home/jdoe; not /home/jdoe2/x or /srv/home/jdoe-old", env)
    assert out == "ckpt ~/models/v3 and ~; not /home/jdoe2/x or /srv/home/jdoe-old"


def test_a_home_folder_inside_another_path_is_left_alone() -> None:
    """HOME=/root (a container's) is not the ``/root`` of another path: those read
    ``/data~/ckpt`` and ``/proc/1~/environ``, folders that do not exist."""
    out = shareable_text("/data/root/ckpt, /proc/1/root/environ, https://git.example.com/root/x, "
                         "/srv/home/jdoe/x; but /root/ckpt and 'file:///root/a'", {"HOME": "/root"})
    assert out == ("/data/root/ckpt, /proc/1/root/environ, https://git.example.com/root/x, "
                   "/srv/home/jdoe/x; but ~/ckpt and 'file://~/a'"), out
    assert shareable_text("x=/home/jdoe/a:/srv/home/jdoe/b", _environ("/home/jdoe")) == "x=~/a:/srv/home/jdoe/b"


def test_an_authors_name_is_no_secret() -> None:
    """``AUTH`` names a secret (``NPM_AUTH``, ``OAUTH_TOKEN``), ``AUTHOR`` does not: the CI's
    GIT_AUTHOR_NAME was redacted wherever the name appeared."""
    env = {"GIT_AUTHOR_NAME": "Continuous Integration", "GIT_AUTHOR_EMAIL": "ci@builds.example.com",
           "NPM_AUTH": "npm-auth-value-123"}
    out = shareable_text("built by Continuous Integration <ci@builds.example.com> with npm-auth-value-123", env)
    assert out == "built by Continuous Integration <ci@builds.example.com> with [redacted NPM_AUTH]", out


def test_shareable_walks_a_report_and_leaves_other_values_alone() -> None:
    env = _environ("/home/jdoe")
    report = {"model": "/home/jdoe/ckpt", "n": 3, "ok": True, "x": None, "rows": [{"/home/jdoe/k": 1.5, "why": SECRET}]}
    out = shareable(report, env)
    assert out == {"model": "~/ckpt", "n": 3, "ok": True, "x": None, "rows": [{"~/k": 1.5, "why": "[redacted MY_SERVICE_API_TOKEN]"}]}
    assert report["model"] == "/home/jdoe/ckpt"  # a copy: the caller's report is left as it was


def test_an_html_escaped_secret_is_redacted_too() -> None:
    env = {"X_TOKEN": "a<b>&'quoted'\"x"}
    import html

    assert "quoted" not in shareable_text(f"<td>{html.escape(env['X_TOKEN'])}</td>", env)


def test_code_path_names_a_source_file_as_its_module_is_imported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import dshal.redact as redact

    assert code_path(redact.__file__) == "dshal/redact.py"
    assert code_path(json.__file__) == "json/__init__.py"  # the standard library's too
    monkeypatch.setenv("HOME", str(tmp_path))
    elsewhere = tmp_path / "scratch" / "plugin.py"  # on no sys.path folder, in the home folder
    assert code_path(str(elsewhere)) == "~/scratch/plugin.py"
    assert code_path("<string>") == "<string>"


def test_bench_and_profile_json_is_shareable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench / profile / diff write their JSON and HTML through dshal.perf.report."""
    from dshal.perf.report import HtmlReport, write_json

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = write_json(tmp_path / "r.json", {"model": str(tmp_path / "home" / "ckpt"), "error": f"401 with {SECRET}"})
    assert json.loads(path.read_text()) == {"model": "~/ckpt", "error": "401 with [redacted HF_TOKEN]"}
    page = HtmlReport("t", meta={"model": str(tmp_path / "home" / "ckpt"), "note": SECRET})
    text = page.write(tmp_path / "r.html").read_text()
    assert str(tmp_path / "home") not in text and SECRET not in text and "~/ckpt" in text


def test_plan_names_its_built_in_config_as_the_package_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dshal.plan.plan import config_label, default_config

    assert config_label(default_config()) == "dshal/plan/data/deepseek_v3_config.json"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_label(tmp_path / "kimi" / "config.json") == "~/kimi/config.json"
    assert config_label("configs/v3.json") == "configs/v3.json"  # as given


def test_the_environment_is_read_when_a_file_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not once at import: a variable set later (a CI step's, a test's) is redacted too."""
    monkeypatch.setenv("LATE_API_TOKEN", "late-secret-value")
    assert "late-secret-value" not in shareable_text("late-secret-value")


def test_host_sync_call_sites_are_named_as_their_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The graph family's host-sync finding names the call site: it was this machine's full path."""
    import importlib

    import torch

    from dshal.perf.syncs import HostSyncCounter

    (tmp_path / "site" / "acme_kernels").mkdir(parents=True)
    (tmp_path / "site" / "acme_kernels" / "__init__.py").write_text("")
    (tmp_path / "site" / "acme_kernels" / "wrapper.py").write_text("def launch(t):\n    return t.sum().item()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    wrapper = importlib.import_module("acme_kernels.wrapper")
    with HostSyncCounter() as counter:
        wrapper.launch(torch.ones(3))
    assert counter.events == [("Tensor.item", "acme_kernels/wrapper.py:2 (launch)")]
