"""compose.yaml and the Dockerfile, checked without a Docker engine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import RABBITMQ_IMAGE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_services_and_the_pinned_broker_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"rabbitmq", "producer", "consumer"}
    assert services["rabbitmq"]["image"] == RABBITMQ_IMAGE  # the tests' container fixture
    assert RABBITMQ_IMAGE.endswith("-management")


def test_broker_has_a_healthcheck_and_workers_wait_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    health = services["rabbitmq"]["healthcheck"]
    assert health["test"][0] == "CMD"
    assert "rabbitmq-diagnostics" in health["test"]
    for worker in ("producer", "consumer"):
        assert services[worker]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert services[worker]["build"] == "."


def test_workers_run_both_example_jobs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["producer"]["command"][:5] == ["objstream", "job", "demo", "--role", "producer"]
    assert services["consumer"]["command"][:5] == ["objstream", "job", "demo", "--role", "consumer"]


def test_credentials_come_from_the_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    broker_env = services["rabbitmq"]["environment"]
    assert broker_env["RABBITMQ_DEFAULT_USER"].startswith("${")
    assert broker_env["RABBITMQ_DEFAULT_PASS"].startswith("${")
    for worker in ("producer", "consumer"):
        env = services[worker]["environment"]
        # Apart from the URL, so a password with '@' or '/' needs no URL-encoding (issue 14.13).
        assert env["OBJSTREAM_URL"] == "amqp://rabbitmq:5672/%2F"
        assert env["OBJSTREAM_USER"] == broker_env["RABBITMQ_DEFAULT_USER"]
        assert env["OBJSTREAM_PASSWORD"] == broker_env["RABBITMQ_DEFAULT_PASS"]
        # One user for both sites: it must speak for both, or their offers are refused.
        assert env["OBJSTREAM_SHARED_USERS"] == broker_env["RABBITMQ_DEFAULT_USER"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "PASSWORD" not in dockerfile
    assert "amqp://" not in dockerfile


def test_the_cluster_profile_has_three_nodes_and_workers_that_know_them_all(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    cluster = {
        name for name, service in services.items() if "cluster" in service.get("profiles", [])
    }
    nodes = ["rabbit-1", "rabbit-2", "rabbit-3"]
    assert cluster == {*nodes, "cluster-producer", "cluster-consumer"}
    for node in nodes:
        assert services[node]["image"] == RABBITMQ_IMAGE
        assert services[node]["hostname"] == node
        assert f"{node}-data:/var/lib/rabbitmq" in services[node]["volumes"]
        start = services[node]["entrypoint"][-1]
        assert all(f"rabbit@{peer}" in start for peer in nodes)
        assert "docker-entrypoint.sh rabbitmq-server" in start
    for worker in ("cluster-producer", "cluster-consumer"):
        env = services[worker]["environment"]
        assert env["OBJSTREAM_QUEUE_TYPE"] == "quorum"
        assert env["OBJSTREAM_URL"].split(",") == [f"amqp://{n}:5672/%2F" for n in nodes]
        assert set(services[worker]["depends_on"]) == set(nodes)


def test_the_regions_profile_federates_a_central_broker_and_two_regions(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    regions = {
        name for name, service in services.items() if "regions" in service.get("profiles", [])
    }
    nodes = {"rabbit-central": ["a", "b"], "rabbit-a": ["central"], "rabbit-b": ["central"]}
    workers = {
        "regions-server": "rabbit-central",
        "regions-site-1": "rabbit-a",
        "regions-site-2": "rabbit-b",
    }
    assert regions == {*nodes, *workers}
    for node, upstreams in nodes.items():
        service = services[node]
        assert service["image"] == RABBITMQ_IMAGE
        assert f"{node}-data:/var/lib/rabbitmq" in service["volumes"]
        start = service["entrypoint"][-1]
        assert "rabbitmq-plugins enable --offline rabbitmq_federation" in start
        # The same definition `objstream admin federation` prints (common/federation.py).
        for setting in (
            '\\"trust-user-id\\": true',
            '\\"max-hops\\": 1',
            "on-confirm",
            '\\"max-length-bytes\\": 1073741824',  # --link-queue-max's default
        ):
            assert setting in start, setting
        names = [up.split("=")[0] for up in service["environment"]["OBJSTREAM_UPSTREAMS"].split()]
        assert names == upstreams
    # The server starts once both sites' inboxes are bound at the centre (their offers need it).
    assert "offer:site-1" in services["rabbit-central"]["healthcheck"]["test"][1]
    for worker, node in workers.items():
        env = services[worker]["environment"]
        assert env["OBJSTREAM_URL"] == f"amqp://{node}:5672/%2F"
        assert env["OBJSTREAM_DECLARE_PEERS"] == "false"
        assert services[worker]["depends_on"] == {node: {"condition": "service_healthy"}}
    # Each side takes the other's messages only by the link they come by.
    links = services["regions-server"]["environment"]["OBJSTREAM_SITE_LINKS"]
    assert links == "site-1=amqp://rabbit-a:5672/%2F,site-2=amqp://rabbit-b:5672/%2F"
    for site in ("regions-site-1", "regions-site-2"):
        links = services[site]["environment"]["OBJSTREAM_SITE_LINKS"]
        assert links == "server=amqp://rabbit-central:5672/%2F"


def test_data_goes_to_named_volumes(compose: dict[str, Any]) -> None:
    assert set(compose["volumes"]) >= {"rabbitmq-data", "consumer-data"}
    assert "consumer-data:/data" in compose["services"]["consumer"]["volumes"]


def test_image_is_slim_and_runs_as_a_non_root_user() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[next(i for i, line in enumerate(lines) if line.startswith("FROM"))].endswith(
        "-slim-bookworm"
    )
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    install = [line for line in lines if "pip install" in line]
    assert install == ["RUN pip install . && rm -rf /src"]  # runtime deps only, no [test]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_validates() -> None:
    run = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
