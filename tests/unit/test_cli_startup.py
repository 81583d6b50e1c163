"""The command line as a new user meets it: global options anywhere, URLs checked, units right,
and a start that imports only what the command runs (issue 14, items 9 and "Start-up time")."""

from __future__ import annotations

import io
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import objstream
from objstream.common.cli import EXIT_USAGE, ProgressBars, build_parser, main
from objstream.common.errors import ConfigError
from objstream.common.settings import MiB, load_settings

SEND = ["producer", "send-file", "--site", "server", "--to", "site-1", "big.bin"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--namespace", "foo", "--url", "amqp://h/", "--log-level", "debug", *SEND],
        ["producer", "--namespace", "foo", "--url", "amqp://h/", "--log-level", "debug",
         *SEND[1:]],
        [*SEND, "--namespace", "foo", "--url", "amqp://h/", "--log-level", "debug"],
        ["--namespace", "bar", *SEND, "--namespace", "foo", "--url", "amqp://h/", "--log-level",
         "debug"],
    ],
)  # fmt: skip
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    for parser in (build_parser(), build_parser(argv=argv)):
        args = parser.parse_args(argv)
        assert (args.namespace, args.url, args.log_level) == ("foo", "amqp://h/", "debug")
        assert args.to == ["site-1"]


def test_global_options_not_given_stay_unset() -> None:
    args = build_parser(argv=SEND).parse_args(SEND)
    assert (args.namespace, args.url, args.log_level) == (None, None, None)


@pytest.mark.parametrize(
    "url",
    ["http://guest:secret@localhost:5672/", "localhost:5672", "amqp://a/,https://b/"],
)
def test_only_amqp_urls_are_settings(url: str) -> None:
    with pytest.raises(ConfigError, match="is not a broker URL: use amqp:// or amqps://"):
        load_settings(url=url)
    assert load_settings(url="amqps://u:p@h:5671/%2F,AMQPS://u:p@g/").url.startswith("amqps://")


def test_an_http_url_is_one_line_exit_2_with_the_password_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", "http://guest:secret@localhost:15672/", "consumer", "listen", "--site",
            "site-1", "--dest", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "objstream: error: invalid setting: url: http://guest:***@localhost:15672/ is not a "
        "broker URL: use amqp:// or amqps://"
    ]


def test_a_url_list_mixing_tls_and_plain_is_one_line_exit_2_in_a_real_process(
    tmp_path: Path,
) -> None:
    """No silent downgrade: a failover from the amqps:// node to the amqp:// one would send the
    password and the objects in the clear. Refused before connecting (nothing listens there)."""
    urls = "amqps://u:s3cret@127.0.0.1:9/%2F,amqp://u:s3cret@127.0.0.1:9/%2F"
    run = subprocess.run(
        [sys.executable, "-m", "objstream", "consumer", "listen", "--site", "a", "--dest",
         str(tmp_path / "in"), "--url", urls],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == EXIT_USAGE, run.stderr
    assert run.stderr.splitlines() == [
        "objstream: error: invalid setting: url: amqps://u:***@127.0.0.1:9/%2F,"
        "amqp://u:***@127.0.0.1:9/%2F mixes amqps:// and amqp:// nodes: a failover would drop "
        "TLS; give every node amqps:// (or every node amqp://)"
    ]
    assert "s3cret" not in run.stderr + run.stdout
    assert not (tmp_path / "in").exists()  # refused before anything was done


@pytest.mark.parametrize("command", ["retrieve-file", "retrieve-container"])
def test_an_empty_object_name_is_one_line_exit_2_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Port 9 (discard) has no broker: a command that connected first would end in exit 3.
    where = ["--dest", str(tmp_path)] if command == "retrieve-file" else ["--out", "m.npz"]
    argv = ["--url", "amqp://guest:guest@127.0.0.1:9/", "consumer", command, "--site", "site-1",
            "--from", "server", "", *where]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == [
        "objstream: error: an object name cannot be empty"
    ]


def test_a_destination_that_is_a_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "in"
    a_file.write_bytes(b"")
    argv = ["--url", "amqp://guest:guest@127.0.0.1:9/", "consumer", "listen", "--site", "site-1",
            "--dest", str(a_file)]  # fmt: skip
    assert main(argv) == EXIT_USAGE  # not "File exists", exit 1 (nor exit 3: checked first)
    assert capsys.readouterr().err.splitlines() == [
        f"objstream: error: destination {a_file} is not a directory"
    ]


def test_object_names_are_checked_in_the_python_api_too() -> None:
    from objstream.common.settings import check_object_name

    assert check_object_name("sub/dir/f.bin") == "sub/dir/f.bin"  # the file server confines it
    with pytest.raises(ConfigError, match="cannot be empty"):
        check_object_name("")
    with pytest.raises(ConfigError, match="1025 characters"):
        check_object_name("x" * 1025)


def test_producer_usage_lists_serve(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["producer", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "{send-file,send-container,serve}" in usage


def test_the_progress_bar_counts_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bars = ProgressBars(enabled=True, delay=0)
    bars("site-1", "s1", 0, 10 * MiB)
    bars("site-1", "s1", 5 * MiB, 10 * MiB)
    bars("site-2", "s2", 3 * MiB, None)
    bars.close()
    shown = err.getvalue()
    assert "/10.0 MiB" in shown
    assert "MiB/s" in shown
    assert "MB/s" not in shown


def _imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after ``code`` (run outside the checkout)."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(objstream.__file__).parent.parent).stdout  # fmt: skip
    return set(out.split())


def test_send_file_imports_no_numpy() -> None:
    modules = _imported_after(
        "from objstream.common.cli import build_parser\n"
        f"build_parser(argv={SEND!r})\n"
        "import objstream.producer.cli, objstream.producer.streamer, objstream.producer\n"
        "from objstream.common.settings import Settings\nSettings()"
    )
    assert "objstream.producer.streamer" in modules
    assert "numpy" not in modules
    assert "objstream.common.codec" not in modules
    assert "pydantic_settings" not in modules  # its import cost more than the rest of settings


def test_version_imports_neither_pydantic_nor_a_side() -> None:
    modules = _imported_after(
        "from objstream.common.cli import build_parser\nbuild_parser(argv=['--version'])"
    )
    assert "objstream.common.cli" in modules
    assert not {"pydantic", "pika", "numpy", "importlib.metadata"} & modules
    # Only commands that run need logging (threading, where the environment's `site` does not
    # import it already).
    assert not {"logging", "threading"} & (modules - _imported_after("pass"))
    assert not {m for m in modules if m.startswith(("objstream.producer", "objstream.consumer"))}


def test_version_is_the_installed_one() -> None:
    assert objstream.__version__ == version("objstream")
