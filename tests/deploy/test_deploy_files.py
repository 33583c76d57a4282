"""The deploy files, checked without AWS and without a Docker engine.

- Every jsonnet under ecspresso/ renders with the `_jsonnet` module, given ecspresso's native
  functions (must_env, env, tfstate, ...) as fakes; the fake Terraform state holds exactly the
  outputs infra/terraform declares (tests/test_terraform.py checks that side), and the result is
  validated against the botocore model of the API call it is the input of.
- Semantic checks tie the files to each other and to mailflow's own Settings.
- Dockerfiles go through hadolint, docker-compose.yml through the compose-spec JSON schema.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import _jsonnet
import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from mailflow.config import Settings

REPO = Path(__file__).resolve().parents[2]
ECSPRESSO = REPO / "ecspresso"
BIN = Path(sys.executable).parent

REGION = "ap-northeast-1"
SES_REGION = "us-east-1"
ACCOUNT = "123456789012"
# What changes per release: the only values ecspresso's definitions take from the environment.
FAKE_ENV = {
    "MAILFLOW_WORKER_IMAGE_TAG": "test-worker",
    "MAILFLOW_PHP_IMAGE_TAG": "@sha256:" + "0" * 64,
}
ECR = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
# The Terraform output `mailflow` (infra/terraform/modules/mailflow/outputs.tf), as the
# tfstate plugin returns it: every key the module declares, with realistic values.
TF_OUTPUT: dict[str, Any] = {
    "region": REGION,
    "receiving_region": SES_REGION,
    "account_id": ACCOUNT,
    "cluster": "orders-prod",
    "service": "mailflow-worker",
    "subnets": ["subnet-0aaa", "subnet-0bbb"],
    "security_groups": ["sg-0ccc"],
    "bucket": "orders-mail-prod",
    "bucket_region": SES_REGION,
    "incoming_prefix": "incoming/",
    "queue": "mailflow-inbound",
    "queue_url": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/mailflow-inbound",
    "dlq": "mailflow-inbound-dlq",
    "max_receive_count": 15,
    "max_attempts": 5,
    "table": "mailflow-deliveries",
    "mail_kms_key_arn": f"arn:aws:kms:{SES_REGION}:{ACCOUNT}:key/{'1234abcd-' * 3}1234567890ab",
    "log_group": "/ecs/mailflow",
    "metrics_namespace": "mailflow",
    "worker_family": "mailflow-worker",
    "reconcile_family": "mailflow-reconcile",
    "worker_task_role_arn": f"arn:aws:iam::{ACCOUNT}:role/mailflow-worker-task",
    "reconcile_task_role_arn": f"arn:aws:iam::{ACCOUNT}:role/mailflow-reconcile-task",
    "execution_role_arn": f"arn:aws:iam::{ACCOUNT}:role/mailflow-task-execution",
    "worker_repository_url": f"{ECR}/mailflow-worker",
    "php_repository_url": f"{ECR}/mailflow-php",
    "secret_parameter_arns": {
        "LEGACY_DB_PASSWORD": (
            f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/mailflow/legacy/db-password"
        ),
    },
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)

_session = botocore.session.get_session()


# --- rendering ----------------------------------------------------------------------------


class MissingEnvError(KeyError):
    pass


def _natives(env: dict[str, str], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """ecspresso's jsonnet native functions, with deterministic fakes."""
    state = {"output.mailflow": TF_OUTPUT if outputs is None else outputs}

    def must_env(name: str) -> str:
        if name not in env:
            raise MissingEnvError(f"must_env: {name} is not set")
        return env[name]

    def env_or(name: str, default: str) -> str:
        return env.get(name, default)

    def ssm(name: str, *_: Any) -> str:
        return f"fake-ssm-value-of:{name}"

    def tfstate(address: str) -> Any:
        # As tfstate-lookup: an unknown address is an error, never a guess.
        if address not in state:
            raise MissingEnvError(f"{address} is not found in tfstate")
        return state[address]

    return {
        "must_env": (("name",), must_env),
        "env": (("name", "default"), env_or),
        "ssm": (("name",), ssm),
        "tfstate": (("address",), tfstate),
    }


def render(
    path: Path, env: dict[str, str] | None = None, outputs: dict[str, Any] | None = None
) -> Any:
    env = FAKE_ENV if env is None else env
    text = _jsonnet.evaluate_file(
        str(path),
        native_callbacks=_natives(env, outputs),
        jpathdir=[str(ECSPRESSO)],
    )
    return json.loads(text)


def jsonnet_files() -> list[Path]:
    return sorted(ECSPRESSO.rglob("*.jsonnet"))


def validate(service: str, operation: str, params: dict[str, Any]) -> None:
    """botocore's own request validation, plus enum membership (which it does not check)."""
    shape = _session.get_service_model(service).operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), f"{service}.{operation}: {report.generate_report()}"
    bad = list(_enum_errors(params, shape, operation))
    assert not bad, f"{service}.{operation}: {bad}"


def _enum_errors(value: Any, shape: Any, where: str):
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                yield from _enum_errors(value[name], member, f"{where}.{name}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _enum_errors(item, shape.member, f"{where}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            yield from _enum_errors(item, shape.value, f"{where}[{key}]")
    elif shape.type_name == "string" and shape.enum and value not in shape.enum:
        yield f"{where}: {value!r} not in {shape.enum}"


@pytest.fixture(scope="module")
def task_def():
    return render(ECSPRESSO / "ecs-task-def.jsonnet")


@pytest.fixture(scope="module")
def service_def():
    return render(ECSPRESSO / "ecs-service-def.jsonnet")


@pytest.fixture(scope="module")
def reconcile_def():
    return render(ECSPRESSO / "reconcile-task-def.jsonnet")


@pytest.fixture(scope="module")
def mf():
    """The shared library itself, rendered: names and knobs the files are built from."""
    snippet = "(import 'mailflow.libsonnet')(std.native('must_env'), std.native('tfstate'))"
    return json.loads(
        _jsonnet.evaluate_snippet(
            "mf", snippet, native_callbacks=_natives(FAKE_ENV), jpathdir=[str(ECSPRESSO)]
        ),
    )


def container(task: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in task["containerDefinitions"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("environment", [])}


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """Build Settings exactly as the process would: from MAILFLOW_* variables."""
    for name in [n for n in __import__("os").environ if n.startswith("MAILFLOW_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("MAILFLOW_"):
            monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


# --- every file renders and is a valid API request ----------------------------------------


@pytest.mark.parametrize("path", jsonnet_files(), ids=lambda p: str(p.relative_to(ECSPRESSO)))
def test_every_jsonnet_file_renders(path):
    rendered = render(path)
    assert isinstance(rendered, dict)
    assert rendered


@pytest.mark.parametrize("path", jsonnet_files(), ids=lambda p: str(p.relative_to(ECSPRESSO)))
def test_a_missing_variable_stops_the_render(path):
    """Each variable a file uses is required: without it the render fails, naming it."""
    full = render(path)
    for name in FAKE_ENV:
        env = {k: v for k, v in FAKE_ENV.items() if k != name}
        try:
            partial = render(path, env)
        except RuntimeError as exc:
            error = str(exc)
        else:
            assert partial == full, f"{name} changes the output but has a silent fallback"
            continue
        assert name in error


@pytest.mark.parametrize("path", jsonnet_files(), ids=lambda p: str(p.relative_to(ECSPRESSO)))
def test_a_missing_terraform_output_stops_the_render(path):
    """A Terraform output the file uses is required: without it the render fails, naming it."""
    full = render(path)
    needed = []
    for key in TF_OUTPUT:
        try:
            partial = render(path, outputs={k: v for k, v in TF_OUTPUT.items() if k != key})
        except RuntimeError as exc:
            error = str(exc)
        else:
            assert partial == full, key
            continue
        assert key in error
        needed.append(key)
    assert needed, "every file takes its resources from the Terraform state"
    with pytest.raises(RuntimeError, match=r"output\.mailflow is not found in tfstate"):
        _jsonnet.evaluate_file(
            str(path),
            native_callbacks={**_natives(FAKE_ENV), "tfstate": (("address",), _no_state)},
            jpathdir=[str(ECSPRESSO)],
        )


def _no_state(address: str) -> Any:
    raise MissingEnvError(f"{address} is not found in tfstate")


def test_task_definitions_are_valid_register_task_definition_requests(task_def, reconcile_def):
    validate("ecs", "RegisterTaskDefinition", task_def)
    validate("ecs", "RegisterTaskDefinition", reconcile_def)


def test_service_definition_is_a_valid_create_service_request(service_def):
    # ecspresso fills these three in from ecspresso.yml and the registered task definition.
    params = {
        **service_def,
        "serviceName": TF_OUTPUT["service"],
        "cluster": TF_OUTPUT["cluster"],
        "taskDefinition": "mailflow-worker:1",
    }
    validate("ecs", "CreateService", params)


# --- the task definition, semantically -----------------------------------------------------


def test_worker_and_sidecar_are_one_fargate_task(task_def):
    assert task_def["networkMode"] == "awsvpc"
    assert task_def["requiresCompatibilities"] == ["FARGATE"]
    # A valid Fargate size pair (cpu units : MiB).
    fargate = {
        "256": range(512, 2049, 512),
        "512": range(1024, 4097, 1024),
        "1024": range(2048, 8193, 1024),
        "2048": range(4096, 16385, 1024),
        "4096": range(8192, 30721, 1024),
    }
    assert int(task_def["memory"]) in fargate[task_def["cpu"]]
    names = [c["name"] for c in task_def["containerDefinitions"]]
    assert sorted(names) == ["php", "worker"]
    assert all(c["essential"] for c in task_def["containerDefinitions"])


def test_stop_timeout_outlasts_the_shutdown_grace(task_def, monkeypatch):
    worker = container(task_def, "worker")
    settings = settings_from(env_of(worker), monkeypatch)
    assert worker["stopTimeout"] <= 120  # Fargate's maximum
    # SIGTERM → drain for shutdown_grace_s → hand back the rest → exit, all before SIGKILL.
    assert worker["stopTimeout"] >= settings.shutdown_grace_s + 10
    assert settings.shutdown_grace_s == 90


def test_worker_reaches_the_sidecar_on_its_port_mapping(task_def, monkeypatch):
    worker, php = container(task_def, "worker"), container(task_def, "php")
    settings = settings_from(env_of(worker), monkeypatch)
    assert settings.processor_transport == "fastcgi"
    host, port = settings.fastcgi_address.rsplit(":", 1)
    assert host == "127.0.0.1"  # same network namespace: never over the VPC
    [mapping] = php["portMappings"]
    assert mapping["containerPort"] == int(port)
    assert mapping["protocol"] == "tcp"
    assert "hostPort" not in mapping or mapping["hostPort"] == mapping["containerPort"]
    assert env_of(php)["MAILFLOW_FASTCGI_ADDRESS"] == settings.fastcgi_address
    assert worker["dependsOn"] == [{"containerName": "php", "condition": "HEALTHY"}]
    assert php["healthCheck"]["command"][0] == "CMD"


def test_sidecar_pool_and_allow_list_fit_the_worker(task_def, monkeypatch):
    worker, php = container(task_def, "worker"), container(task_def, "php")
    settings = settings_from(env_of(worker), monkeypatch)
    php_env = env_of(php)
    assert int(php_env["MAILFLOW_FPM_MAX_CHILDREN"]) >= settings.concurrency
    assert (
        int(php_env["MAILFLOW_FPM_REQUEST_TERMINATE_TIMEOUT"])
        > settings.processor_timeout_s + settings.kill_grace_s
    )
    allowed = json.loads(php_env["MAILFLOW_RUNNER_ALLOW"])
    for route in settings.routes:
        argv = shlex.split(route.command)
        assert any(argv[: len(prefix)] == prefix for prefix in allowed), route.command


def test_worker_settings_are_valid_and_consistent(task_def, monkeypatch):
    settings = settings_from(env_of(container(task_def, "worker")), monkeypatch)
    assert settings.bucket == TF_OUTPUT["bucket"]
    assert settings.allowed_buckets == (TF_OUTPUT["bucket"],)
    assert settings.queue == TF_OUTPUT["queue"]
    assert settings.dlq == TF_OUTPUT["dlq"]
    assert settings.table == TF_OUTPUT["table"]
    assert settings.incoming_prefix == TF_OUTPUT["incoming_prefix"]
    # Two regions: S3 and KMS calls go to where SES stored and encrypted the mail.
    assert settings.mail_region == TF_OUTPUT["bucket_region"] == SES_REGION
    assert settings.kms_key == TF_OUTPUT["mail_kms_key_arn"]
    assert settings.log_format == "json"
    # The worker's attempt limit is the one Terraform derived the queue's redrive from.
    assert settings.max_attempts == TF_OUTPUT["max_attempts"]
    assert settings.max_receive_count >= 3 * settings.max_attempts
    assert settings.routes
    for route in settings.routes:
        assert route.match.startswith("ne-")


def test_images_are_the_terraform_repositories_at_the_release_tags(task_def, reconcile_def):
    worker_image = f"{TF_OUTPUT['worker_repository_url']}:test-worker"
    php_image = TF_OUTPUT["php_repository_url"] + FAKE_ENV["MAILFLOW_PHP_IMAGE_TAG"]  # digest
    for task in (task_def, reconcile_def):
        for c in task["containerDefinitions"]:
            assert c["image"] in {worker_image, php_image}, c["name"]
    assert container(task_def, "worker")["image"] == worker_image
    assert container(task_def, "php")["image"] == php_image
    registry = re.compile(r"dkr\.ecr\.|docker\.io|ghcr\.io|public\.ecr\.aws|quay\.io|:latest\b")
    for path in jsonnet_files():
        assert not registry.search(path.read_text(encoding="utf-8")), path


def test_no_secret_in_plain_environment(task_def, reconcile_def):
    for task in (task_def, reconcile_def):
        for c in task["containerDefinitions"]:
            for name, value in env_of(c).items():
                if value.startswith("arn:aws:kms:"):
                    continue  # a key's ARN names the key; it is not key material
                assert not SECRET_NAME.search(name), f"{c['name']}: {name} belongs in secrets"
            for secret in c.get("secrets", []):
                assert secret["valueFrom"] == TF_OUTPUT["secret_parameter_arns"][secret["name"]]
    worker = container(task_def, "worker")
    passed_on = set(env_of(worker)["MAILFLOW_PASS_ENV"].split(","))
    assert {s["name"] for s in worker["secrets"]} <= passed_on  # the legacy script needs them


def test_worker_health_check_is_the_heartbeat(task_def):
    check = container(task_def, "worker")["healthCheck"]
    assert check["command"][0] == "CMD"
    assert check["command"][1:] == ["mailflow", "check"]
    assert check["startPeriod"] >= 30


def test_read_only_roots_with_writable_volumes_where_needed(task_def, reconcile_def, monkeypatch):
    for task in (task_def, reconcile_def):
        volumes = {v["name"] for v in task["volumes"]}
        for c in task["containerDefinitions"]:
            assert c["readonlyRootFilesystem"] is True, c["name"]
            assert c["linuxParameters"]["initProcessEnabled"] is True, c["name"]
            for mount in c.get("mountPoints", []):
                assert mount["sourceVolume"] in volumes
            assert "/tmp" in {m["containerPath"] for m in c.get("mountPoints", [])}, c["name"]
        for volume in task["volumes"]:
            assert set(volume) == {"name"}, "Fargate: task-scoped bind mounts only"
    worker = container(task_def, "worker")
    settings = settings_from(env_of(worker), monkeypatch)
    mounted = {m["containerPath"] for m in worker["mountPoints"]}
    assert str(settings.spool_dir) in mounted
    assert str(settings.health_file.parent) in mounted


def _volume_paths(dockerfile: Path) -> set[str]:
    paths: set[str] = set()
    for stage in _stages(dockerfile.read_text(encoding="utf-8"))[-1:]:
        for line in stage:
            if line.upper().startswith("VOLUME "):
                spec = line.split(None, 1)[1]
                paths.update(json.loads(spec) if spec.startswith("[") else spec.split())
    return paths


def test_worker_mounts_are_image_volumes(task_def, reconcile_def):
    """Fargate bind mounts are root-owned 0755 unless the image declares the path as a VOLUME
    with its owner: then ECS copies owner and mode. The worker runs as uid 10001."""
    declared = _volume_paths(REPO / "Dockerfile")
    for c in [container(task_def, "worker"), *reconcile_def["containerDefinitions"]]:
        for mount in c["mountPoints"]:
            assert mount["containerPath"] in declared, mount


def test_sidecar_mounts_are_image_volumes(task_def):
    """Same rule for the php sidecar (uid 33): its writable paths must be VOLUMEs it owns."""
    dockerfile = REPO / "sidecar" / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("sidecar/Dockerfile does not exist yet")
    declared = _volume_paths(dockerfile)
    missing = [
        m["containerPath"]
        for m in container(task_def, "php")["mountPoints"]
        if m["containerPath"] not in declared
    ]
    assert not missing, f"sidecar/Dockerfile must declare {missing} as VOLUME (read-only root)"


def test_every_container_logs_to_cloudwatch(task_def, reconcile_def):
    for task in (task_def, reconcile_def):
        for c in task["containerDefinitions"]:
            log = c["logConfiguration"]
            assert log["logDriver"] == "awslogs"
            assert log["options"]["awslogs-region"] == REGION
            assert log["options"]["mode"] == "non-blocking"


def test_reconciler_runs_the_worker_image_without_the_sidecar(reconcile_def, task_def):
    [c] = reconcile_def["containerDefinitions"]
    assert c["command"] == ["reconcile"]
    assert c["image"] == container(task_def, "worker")["image"]
    assert reconcile_def["family"] != task_def["family"]
    assert reconcile_def["taskRoleArn"] != task_def["taskRoleArn"]


# --- service -------------------------------------------------------------------------------


def test_service_never_drops_capacity_on_deploy(service_def, mf):
    assert service_def["launchType"] == "FARGATE"
    deployment = service_def["deploymentConfiguration"]
    assert deployment["minimumHealthyPercent"] >= 100
    assert deployment["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    vpc = service_def["networkConfiguration"]["awsvpcConfiguration"]
    assert vpc["subnets"] == TF_OUTPUT["subnets"]
    assert vpc["securityGroups"] == TF_OUTPUT["security_groups"]
    assert vpc["assignPublicIp"] == "DISABLED"


def test_scaling_target_fits_the_task(mf):
    """Terraform's backlog-per-task target is this task's throughput over the accepted latency:
    raising the concurrency without it would scale out too early."""
    import hcl2  # noqa: PLC0415 - only this test reads HCL here

    path = REPO / "infra" / "terraform" / "modules" / "mailflow" / "variables.tf"
    with path.open(encoding="utf-8") as handle:
        variables = {k: v for entry in hcl2.load(handle)["variable"] for k, v in entry.items()}
    [target] = [v for k, v in variables.items() if k.strip('"') == "backlog_per_task_target"]
    assert target["default"] == mf["backlog_per_task_target"] == 60 / 5 * mf["concurrency"]


def test_service_leaves_the_count_to_auto_scaling(service_def):
    """ecspresso's calcDesiredCount sends a definition's desiredCount with every deploy unless
    --tasks is given: any value here would reset a scaled-out service to it mid-backlog."""
    assert "desiredCount" not in service_def


# --- ecspresso configs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ecspresso.yml", "reconcile.yml"])
def test_ecspresso_configs_take_where_from_the_environment(name):
    config = yaml.safe_load((ECSPRESSO / name).read_text(encoding="utf-8"))
    assert config["region"] == "{{ must_env `AWS_REGION` }}"
    assert config["cluster"] == "{{ must_env `ECS_CLUSTER` }}"
    if name == "ecspresso.yml":
        assert config["service"] == "{{ must_env `MAILFLOW_SERVICE` }}"
    for key in ("task_definition", "service_definition"):
        assert (ECSPRESSO / config[key]).is_file(), config[key]
    # ecspresso v3 changed behaviour: the files are checked against v2 only.
    assert config["required_version"] == ">= 2.4.0, < 3.0.0"
    # Everything else comes from the Terraform state of infra/terraform.
    assert config["plugins"] == [
        {"name": "tfstate", "config": {"url": "{{ must_env `MAILFLOW_TFSTATE_URL` }}"}},
    ]


# --- Dockerfiles ------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = BIN / "hadolint"
    if not exe.exists():
        pytest.skip(f"no hadolint next to {sys.executable}")
    return subprocess.run(
        [str(exe), "--no-color", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("relative", ["Dockerfile", "sidecar/Dockerfile"])
def test_dockerfiles_pass_hadolint(relative):
    path = REPO / relative
    if not path.exists():
        pytest.skip(f"{relative} does not exist yet")
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(dockerfile: str) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile)
    stages: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        elif not stages:
            continue  # a global ARG before the first FROM (e.g. the base image's version)
        stages[-1].append(line)
    return stages


def test_worker_image_shape():
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    bases = [s[0].split()[1] for s in stages]
    assert len(set(bases)) == 1, "builder and runtime on the same base"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0])
    final = stages[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the runtime stage sets a user"
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric user, checkable by runtimes"
    assert "STOPSIGNAL SIGTERM" in final
    [health] = [line for line in final if line.startswith("HEALTHCHECK")]
    assert '["mailflow", "check"]' in health
    copies = [line for line in final if line.startswith("COPY")]
    assert copies
    assert all("--from=" in line for line in copies), "only the built venv is copied"
    assert "php" not in " ".join(final).lower().replace("sidecar", ""), "no PHP in the worker"
    # Paths the worker writes are volumes, and the Settings defaults baked in agree.
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert "MAILFLOW_SPOOL_DIR=/var/spool/mailflow" in env
    assert "MAILFLOW_HEALTH_FILE=/run/mailflow/worker.health" in env
    [volume] = [line for line in final if line.startswith("VOLUME")]
    assert json.loads(volume.split(None, 1)[1]) == ["/var/spool/mailflow", "/run/mailflow", "/tmp"]


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    stages = _stages((REPO / "Dockerfile").read_text(encoding="utf-8"))
    for line in (line for stage in stages for line in stage):
        if line.startswith("COPY") and "--from=" not in line:
            sources = line.split()[1:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    assert ".env" not in allowed
    assert not (allowed - {"requirements.lock", "pyproject.toml", "README.md", "src"})


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_file_matches_the_compose_spec():
    exe = BIN / "check-jsonschema"
    if not exe.exists():
        pytest.skip(f"no check-jsonschema next to {sys.executable}")
    result = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


VARIANTS = ("localstack", "moto")


def _active(compose: dict[str, Any], profiles: set[str]) -> dict[str, Any]:
    """The services `docker compose --profile P ... up` starts (no profiles: always)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & profiles
    }


def _clashes(services: dict[str, Any]) -> list[str]:
    """What two services of one running project would fight over."""
    found = []
    seen: dict[str, str] = {}
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host = mapping.rsplit(":", 1)[0]  # ip:host_port (the container port is per service)
            if host in seen:
                found.append(f"port {host}: {seen[host]} and {name}")
            seen[host] = name
    names = [s["container_name"] for s in services.values() if "container_name" in s]
    found += [f"container_name {n}" for n in set(names) if names.count(n) > 1]
    aliases = [
        alias
        for s in services.values()
        for net in (s.get("networks") or {}).values()
        for alias in (net or {}).get("aliases", [])
    ]
    found += [f"network alias {a}" for a in set(aliases) if aliases.count(a) > 1]
    built: dict[str, Any] = {}
    for name, service in services.items():
        if "build" in service:
            image = service["image"]
            if image in built and built[image] != service["build"]:
                found.append(f"image {image}: two different builds ({name})")
            built[image] = service["build"]
    return found


@pytest.mark.parametrize("profile", VARIANTS)
def test_each_compose_variant_starts_alone_without_clashes(compose, profile):
    services = _active(compose, {profile})
    assert {n for n in services if n in VARIANTS} == {profile}, "exactly its own backend"
    assert not _clashes(services)
    [backend] = [services[profile]]
    assert backend["networks"]["default"]["aliases"] == ["aws"]
    assert "healthcheck" in backend
    # Every mailflow service reaches the running backend through the alias, with botocore's
    # own variable, and waits for it.
    for name in ("provision", "worker", "reconciler", "smtp"):
        assert services[name]["environment"]["AWS_ENDPOINT_URL"] == "http://aws:4566"
    deps = services["provision"]["depends_on"]
    assert deps[profile] == {"condition": "service_healthy", "required": False}
    for name, service in services.items():
        for target, dep in (service.get("depends_on") or {}).items():
            assert target in services or dep.get("required") is False, (name, target)


def test_the_clash_check_sees_both_backends_at_once(compose):
    """The check above can fail: both profiles at once publish 4566 twice (and two `aws`)."""
    clashes = _clashes(_active(compose, set(VARIANTS)))
    assert any("127.0.0.1:4566" in c for c in clashes)
    assert any("alias aws" in c for c in clashes)


def test_compose_needs_a_variant(compose):
    """No service runs without a profile: a plain `up` cannot start half a stack."""
    assert not _active(compose, set())
    assert "${MAILFLOW_BACKEND" not in (REPO / "docker-compose.yml").read_text(encoding="utf-8")


def test_plain_compose_up_runs_the_localstack_variant(compose):
    """Compose reads COMPOSE_PROFILES from the project's .env: a plain `docker compose up`
    starts LocalStack alone; a shell COMPOSE_PROFILES=moto wins over the file."""
    lines = (REPO / ".env").read_text(encoding="utf-8").splitlines()
    settings = dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))
    assert settings == {"COMPOSE_PROFILES": "localstack"}
    default = _active(compose, set(settings["COMPOSE_PROFILES"].split(",")))
    assert {n for n in default if n in VARIANTS} == {"localstack"}
    assert {"worker", "php", "provision", "smtp", "reconciler"} <= set(default)


def test_compose_localstack_is_a_free_pinned_tag(compose):
    ls = compose["services"]["localstack"]
    assert set(ls["environment"]["SERVICES"].split(",")) >= {"s3", "sqs", "sns", "dynamodb"}
    # LocalStack's free community builds end at 4.14; later tags need an auth token.
    image, tag = ls["image"].split(":")
    assert image == "localstack/localstack"
    assert tuple(int(x) for x in tag.split(".")[:2]) <= (4, 14)
    assert "LOCALSTACK_AUTH_TOKEN" in ls["environment"]
    for name, service in compose["services"].items():
        if "image" in service and "build" not in service:
            assert not service["image"].endswith(":latest"), name


def test_compose_moto_is_mailflows_own_server(compose):
    """The stock moto image lacks the DynamoDB serialization that claims rely on; the moto
    variant runs mailflow.dev.motoserver from the worker image with the dev extra. Its exact
    command and health check are run here against a real server."""
    moto = compose["services"]["moto"]
    assert moto["build"]["args"] == {"MAILFLOW_EXTRAS": "dev"}
    assert moto["image"] != compose["services"]["worker"]["image"]
    dev_extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert any(
        d.startswith("moto[server]") for d in dev_extra["project"]["optional-dependencies"]["dev"]
    )
    assert "ARG MAILFLOW_EXTRAS" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert moto["entrypoint"] == ["python", "-m", "mailflow.dev.motoserver"]
    command = [a if a != "0.0.0.0" else "127.0.0.1" for a in moto["command"]]
    command[command.index("--port") + 1] = "0"  # a free port here; 4566 in the container
    server = subprocess.Popen(
        [sys.executable, "-m", "mailflow.dev.motoserver", *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("MOTO_URL=")
        port = url.rsplit(":", 1)[1]
        check = moto["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"]
        probe = check[3].replace("127.0.0.1:4566", f"127.0.0.1:{port}")
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=30)
    finally:
        server.terminate()
        server.communicate(timeout=10)  # reaps it and closes its stdout


def test_compose_start_order(compose):
    services = compose["services"]
    assert services["worker"]["depends_on"]["provision"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["worker"]["depends_on"]["php"]["condition"] == "service_healthy"
    for name in ("smtp", "reconciler"):
        assert services[name]["depends_on"]["provision"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["php"]["healthcheck"]["test"][0] == "CMD"
    assert services["provision"]["command"] == ["provision"]


def test_compose_worker_mirrors_the_ecs_task(compose, task_def, monkeypatch):
    services = compose["services"]
    worker, php = services["worker"], services["php"]
    # Shared network namespace, as awsvpc: the loopback-only pool config holds unchanged.
    assert worker["network_mode"] == "service:php"
    settings = settings_from(worker["environment"], monkeypatch)
    assert settings.processor_transport == "fastcgi"
    assert settings.fastcgi_address == php["environment"]["MAILFLOW_FASTCGI_ADDRESS"]
    assert (
        settings.fastcgi_address
        == env_of(container(task_def, "worker"))["MAILFLOW_FASTCGI_ADDRESS"]
    )
    assert "./examples/legacy:/app/legacy:ro" in php["volumes"]
    allowed = json.loads(php["environment"]["MAILFLOW_RUNNER_ALLOW"])
    for route in settings.routes:
        argv = shlex.split(route.command)
        assert any(argv[: len(prefix)] == prefix for prefix in allowed)
    grace = _seconds(worker["stop_grace_period"])
    assert grace > settings.shutdown_grace_s
    assert worker["read_only"] is True
    tmpfs = {entry.split(":")[0] for entry in worker["tmpfs"]}
    assert {"/tmp", "/var/spool/mailflow", "/run/mailflow"} <= tmpfs
    assert worker["init"] is True


def test_compose_smtp_front_door(compose):
    smtp = compose["services"]["smtp"]
    command = smtp["command"]
    assert command[:1] == ["smtp"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "2525"
    assert smtp["ports"] == ["127.0.0.1:2525:2525"]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "m" else 1)
