"""The deploy files, checked without AWS and without a Docker engine.

- Every jsonnet under ecspresso/ renders with the `_jsonnet` module, given ecspresso's native
  functions (must_env, env, ...) or `std.extVar` values as fakes, and the result is validated
  against the botocore model of the API call it is the input of.
- Semantic checks tie the files to each other and to mailflow's own Settings.
- Dockerfiles go through hadolint, docker-compose.yml through the compose-spec JSON schema.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import _jsonnet
import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from mailflow import metrics
from mailflow.config import Settings

REPO = Path(__file__).resolve().parents[1]
ECSPRESSO = REPO / "ecspresso"
BIN = Path(sys.executable).parent

REGION = "ap-northeast-1"
ACCOUNT = "123456789012"
FAKE_ENV = {
    "AWS_REGION": REGION,
    "AWS_ACCOUNT_ID": ACCOUNT,
    "ECS_CLUSTER": "orders-prod",
    "MAILFLOW_SERVICE": "mailflow-worker",
    "MAILFLOW_SUBNETS": "subnet-0aaa,subnet-0bbb",
    "MAILFLOW_SECURITY_GROUPS": "sg-0ccc",
    "MAILFLOW_WORKER_IMAGE": "fake-registry.invalid/mailflow:test-worker",
    "MAILFLOW_PHP_IMAGE": "fake-registry.invalid/mailflow-php:test-php",
    "MAILFLOW_BUCKET": "orders-mail-prod",
    "MAILFLOW_QUEUE": "mailflow-inbound",
    "MAILFLOW_TABLE": "mailflow-deliveries",
    "MAILFLOW_ALARM_TOPIC_ARN": f"arn:aws:sns:{REGION}:{ACCOUNT}:ops-alerts",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)

_session = botocore.session.get_session()


# --- rendering ----------------------------------------------------------------------------


class MissingEnvError(KeyError):
    pass


def _natives(env: dict[str, str]) -> dict[str, Any]:
    """ecspresso's jsonnet native functions, with deterministic fakes."""

    def must_env(name: str) -> str:
        if name not in env:
            raise MissingEnvError(f"must_env: {name} is not set")
        return env[name]

    def env_or(name: str, default: str) -> str:
        return env.get(name, default)

    def ssm(name: str, *_: Any) -> str:
        return f"fake-ssm-value-of:{name}"

    def tfstate(address: str) -> str:
        return f"fake-tfstate:{address}"

    return {
        "must_env": (("name",), must_env),
        "env": (("name", "default"), env_or),
        "ssm": (("name",), ssm),
        "tfstate": (("address",), tfstate),
    }


def render(path: Path, env: dict[str, str] | None = None) -> Any:
    env = FAKE_ENV if env is None else env
    text = _jsonnet.evaluate_file(
        str(path),
        native_callbacks=_natives(env),
        ext_vars=env,
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
    snippet = "(import 'mailflow.libsonnet')(std.native('must_env'))"
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
    needed = []
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
        needed.append(name)
    assert needed, "every file takes at least its environment from must_env"


def test_task_definitions_are_valid_register_task_definition_requests(task_def, reconcile_def):
    validate("ecs", "RegisterTaskDefinition", task_def)
    validate("ecs", "RegisterTaskDefinition", reconcile_def)


def test_service_definition_is_a_valid_create_service_request(service_def):
    # ecspresso fills these three in from ecspresso.yml and the registered task definition.
    params = {
        **service_def,
        "serviceName": FAKE_ENV["MAILFLOW_SERVICE"],
        "cluster": FAKE_ENV["ECS_CLUSTER"],
        "taskDefinition": "mailflow-worker:1",
    }
    validate("ecs", "CreateService", params)


def test_scaling_files_are_valid_application_autoscaling_requests():
    validate(
        "application-autoscaling",
        "RegisterScalableTarget",
        render(ECSPRESSO / "scalable-target.jsonnet"),
    )
    validate(
        "application-autoscaling", "PutScalingPolicy", render(ECSPRESSO / "scaling-policy.jsonnet")
    )


def test_reconcile_schedule_is_a_valid_create_schedule_request():
    validate("scheduler", "CreateSchedule", render(ECSPRESSO / "reconcile-schedule.jsonnet"))


def test_alarms_and_dashboard_are_valid_cloudwatch_requests():
    alarms = render(ECSPRESSO / "alarms.jsonnet")
    assert len(alarms) >= 4
    for filename, alarm in alarms.items():
        assert filename == f"{alarm['AlarmName']}.json"
        validate("cloudwatch", "PutMetricAlarm", alarm)
    validate("cloudwatch", "PutDashboard", render(ECSPRESSO / "dashboard.jsonnet"))


@pytest.mark.parametrize(
    "path", sorted((ECSPRESSO / "iam").glob("*.jsonnet")), ids=lambda p: p.name
)
def test_iam_policies_are_valid_put_role_policy_requests(path):
    request = render(path)
    validate("iam", "PutRolePolicy", request)
    document = json.loads(request["PolicyDocument"])
    assert document["Version"] == "2012-10-17"
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in statement["Action"]:
            assert "*" not in action, f"{path.name}: wildcard action {action}"
        if statement["Resource"] == ["*"]:
            # Only actions that have no resource-level permissions may use "*".
            assert statement["Action"] == ["ecr:GetAuthorizationToken"], statement


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
    assert settings.bucket == FAKE_ENV["MAILFLOW_BUCKET"]
    assert settings.allowed_buckets == (FAKE_ENV["MAILFLOW_BUCKET"],)
    assert settings.queue == FAKE_ENV["MAILFLOW_QUEUE"]
    assert settings.table == FAKE_ENV["MAILFLOW_TABLE"]
    assert settings.log_format == "json"
    # Every receive counts, deferrals too: the redrive threshold keeps a wide margin.
    assert settings.max_receive_count >= 3 * settings.max_attempts
    assert settings.routes
    for route in settings.routes:
        assert route.match.startswith("ne-")


def test_images_come_from_the_environment(task_def, reconcile_def):
    images = {FAKE_ENV["MAILFLOW_WORKER_IMAGE"], FAKE_ENV["MAILFLOW_PHP_IMAGE"]}
    for task in (task_def, reconcile_def):
        for c in task["containerDefinitions"]:
            assert c["image"] in images, c["name"]
    assert container(task_def, "worker")["image"] == FAKE_ENV["MAILFLOW_WORKER_IMAGE"]
    assert container(task_def, "php")["image"] == FAKE_ENV["MAILFLOW_PHP_IMAGE"]
    registry = re.compile(r"dkr\.ecr\.|docker\.io|ghcr\.io|public\.ecr\.aws|quay\.io|:latest\b")
    for path in jsonnet_files():
        assert not registry.search(path.read_text(encoding="utf-8")), path


def test_no_secret_in_plain_environment(task_def, reconcile_def):
    for task in (task_def, reconcile_def):
        for c in task["containerDefinitions"]:
            for name in env_of(c):
                assert not SECRET_NAME.search(name), f"{c['name']}: {name} belongs in secrets"
            for secret in c.get("secrets", []):
                assert secret["valueFrom"].startswith(f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/")
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


# --- service, scaling, schedule, alarms ----------------------------------------------------


def test_service_never_drops_capacity_on_deploy(service_def, mf):
    assert service_def["launchType"] == "FARGATE"
    deployment = service_def["deploymentConfiguration"]
    assert deployment["minimumHealthyPercent"] >= 100
    assert deployment["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    vpc = service_def["networkConfiguration"]["awsvpcConfiguration"]
    assert vpc["subnets"] == FAKE_ENV["MAILFLOW_SUBNETS"].split(",")
    assert vpc["assignPublicIp"] == "DISABLED"
    assert service_def["desiredCount"] == mf["min_tasks"]


def test_scaling_tracks_backlog_per_task(mf):
    target = render(ECSPRESSO / "scalable-target.jsonnet")
    policy = render(ECSPRESSO / "scaling-policy.jsonnet")
    resource = f"service/{FAKE_ENV['ECS_CLUSTER']}/{FAKE_ENV['MAILFLOW_SERVICE']}"
    assert target["ResourceId"] == policy["ResourceId"] == resource
    assert target["MinCapacity"] >= 1  # the expression divides by the running task count
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == (
        mf["acceptable_latency_s"] / mf["mean_processing_s"] * mf["concurrency"]
    )
    by_id = {m["Id"]: m for m in config["CustomizedMetricSpecification"]["Metrics"]}
    [result] = [m for m in by_id.values() if m["ReturnData"]]
    assert result["Expression"] == "visible / tasks"
    visible = by_id["visible"]["MetricStat"]["Metric"]
    assert visible["Namespace"] == "AWS/SQS"
    assert visible["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert visible["Dimensions"] == [{"Name": "QueueName", "Value": FAKE_ENV["MAILFLOW_QUEUE"]}]
    tasks = by_id["tasks"]["MetricStat"]["Metric"]
    assert (tasks["Namespace"], tasks["MetricName"]) == (
        "ECS/ContainerInsights",
        "RunningTaskCount",
    )
    assert {d["Name"]: d["Value"] for d in tasks["Dimensions"]} == {
        "ClusterName": FAKE_ENV["ECS_CLUSTER"],
        "ServiceName": FAKE_ENV["MAILFLOW_SERVICE"],
    }
    assert config["ScaleInCooldown"] >= config["ScaleOutCooldown"]


def test_schedule_runs_the_reconcile_task_in_the_service_network(reconcile_def, service_def):
    schedule = render(ECSPRESSO / "reconcile-schedule.jsonnet")
    ecs = schedule["Target"]["EcsParameters"]
    family = ecs["TaskDefinitionArn"].rsplit("/", 1)[1]
    assert family == reconcile_def["family"]  # no revision: the latest ACTIVE one
    assert schedule["Target"]["Arn"].endswith(f":cluster/{FAKE_ENV['ECS_CLUSTER']}")
    vpc = ecs["NetworkConfiguration"]["awsvpcConfiguration"]
    service_vpc = service_def["networkConfiguration"]["awsvpcConfiguration"]
    assert vpc["Subnets"] == service_vpc["subnets"]
    assert vpc["SecurityGroups"] == service_vpc["securityGroups"]
    assert schedule["ScheduleExpression"].startswith(("rate(", "cron("))


def test_alarms_watch_the_right_things(task_def, monkeypatch):
    settings = settings_from(env_of(container(task_def, "worker")), monkeypatch)
    alarms = {a["AlarmName"]: a for a in render(ECSPRESSO / "alarms.jsonnet").values()}
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == [FAKE_ENV["MAILFLOW_ALARM_TOPIC_ARN"]]

    dlq = alarms["mailflow-dlq-not-empty"]
    assert dlq["Dimensions"] == [{"Name": "QueueName", "Value": settings.dlq}]
    assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (0, "GreaterThanThreshold")

    age = alarms["mailflow-oldest-message-age"]
    assert age["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert age["Dimensions"] == [{"Name": "QueueName", "Value": settings.queue}]

    # The failure rate is computed from the worker's own EMF metric: same namespace, name
    # and dimension as metrics.emf() writes.
    emitted = metrics.emf(
        settings.metrics_namespace,
        route="store",
        status="failed",
        attempt=1,
        processor_ms=1.0,
        queue_lag_ms=1.0,
        now_ms=0,
    )["_aws"]["CloudWatchMetrics"][0]
    rate = alarms["mailflow-failure-rate"]
    stats = [m["MetricStat"]["Metric"] for m in rate["Metrics"] if "MetricStat" in m]
    for metric in stats:
        assert metric["Namespace"] == emitted["Namespace"]
        assert metric["MetricName"] in {m["Name"] for m in emitted["Metrics"]}
        assert [[d["Name"] for d in metric["Dimensions"]]] in [[d] for d in emitted["Dimensions"]]
    assert {m["Dimensions"][0]["Value"] for m in stats} == {"failed", "succeeded"}

    heartbeat = alarms["mailflow-no-healthy-worker"]
    assert heartbeat["TreatMissingData"] == "breaching"


def test_dashboard_metrics_are_well_formed():
    dashboard = render(ECSPRESSO / "dashboard.jsonnet")
    body = json.loads(dashboard["DashboardBody"])
    for widget in body["widgets"]:
        ids = set()
        for line in widget["properties"]["metrics"]:
            options = line[-1]
            assert isinstance(options, dict)
            assert all(isinstance(part, str) for part in line[:-1])
            if "expression" in options:
                used = set(re.findall(r"[a-z][a-zA-Z0-9_]*", options["expression"]))
                assert used <= ids, (options, ids)
            else:
                assert len(line) % 2 == 1  # namespace, name, then dimension name/value pairs
            if "id" in options:
                ids.add(options["id"])


def test_worker_role_is_least_privilege(mf):
    doc = json.loads(
        render(ECSPRESSO / "iam" / "worker-task-role-policy.jsonnet")["PolicyDocument"]
    )
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    assert not any(a.startswith("sns:") for a in actions), "only the SES emulator publishes"
    assert not {"s3:PutObject", "s3:DeleteObject", "dynamodb:DeleteItem", "dynamodb:Scan"} & actions
    assert {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "s3:GetObject",
        "dynamodb:UpdateItem",
    } <= actions
    resources = {r for s in doc["Statement"] for r in s["Resource"]}
    assert resources == {
        mf["queue_arn"],
        mf["dlq_arn"],
        f"{mf['bucket_arn']}/incoming/*",
        mf["bucket_arn"],
        mf["table_arn"],
    }
    [send] = [s for s in doc["Statement"] if "sqs:SendMessage" in s["Action"]]
    assert send["Resource"] == [mf["dlq_arn"]]


def test_reconciler_role_writes_only_archives(mf):
    doc = json.loads(
        render(ECSPRESSO / "iam" / "reconcile-task-role-policy.jsonnet")["PolicyDocument"],
    )
    for statement in doc["Statement"]:
        if "s3:PutObject" in statement["Action"]:
            assert statement["Resource"] == [
                f"{mf['bucket_arn']}/{p}*" for p in ("processed/", "failed/", "quarantine/")
            ]
        if "s3:DeleteObject" in statement["Action"]:
            assert statement["Resource"] == [f"{mf['bucket_arn']}/incoming/*"]
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    assert "sqs:ReceiveMessage" not in actions
    assert "sqs:DeleteMessage" not in actions


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


def test_compose_backends_localstack_by_default_moto_by_profile(compose):
    services = compose["services"]
    ls, moto = services["localstack"], services["moto"]
    assert "profiles" not in ls  # plain `docker compose up` runs on LocalStack
    assert moto["profiles"] == ["moto"]
    for backend in (ls, moto):
        assert "healthcheck" in backend
    assert ls["environment"]["SERVICES"] == "s3,sqs,sns,dynamodb"
    # LocalStack's free community builds end at 4.14; later tags need an auth token.
    image, tag = ls["image"].split(":")
    assert image == "localstack/localstack"
    assert tuple(int(x) for x in tag.split(".")[:2]) <= (4, 14)
    assert "LOCALSTACK_AUTH_TOKEN" in ls["environment"]
    assert re.fullmatch(r"motoserver/moto:\d+\.\d+\.\d+", moto["image"])
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert not service["image"].endswith(":latest"), name
    # Every mailflow service talks to the alias through botocore's own variable.
    for name in ("provision", "worker", "reconciler", "smtp"):
        endpoint = services[name]["environment"]["AWS_ENDPOINT_URL"]
        assert endpoint == "http://${MAILFLOW_BACKEND:-localstack}:4566"
        backend_deps = services["provision"]["depends_on"]
        assert backend_deps["localstack"] == {"condition": "service_healthy", "required": False}
        assert backend_deps["moto"] == {"condition": "service_healthy", "required": False}


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
