"""infra/terraform, checked without a terraform binary and without AWS.

- Every file parses (python-hcl2 for .tf, json for .tf.json), and checkov passes with a reason
  written next to every skip.
- Terraform and `mailflow provision` agree on every name and shape the code relies on: the
  module's values are read from its HCL and resolved against shapes.tf.json, which must be
  exactly what mailflow.aws.shapes generates; provision runs against a moto server and what it
  made is compared with what Terraform declares.
- The IAM policies (their only definition) are least privilege; ecspresso reads only outputs
  the module declares.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import boto3
import hcl2
import pytest
from test_deploy_files import TF_OUTPUT

from mailflow import metrics
from mailflow.aws import shapes
from mailflow.config import Settings

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "infra" / "terraform"
MODULE = TERRAFORM / "modules" / "mailflow"
EXAMPLE = TERRAFORM / "examples" / "production"
SHAPES = json.loads((MODULE / "shapes.tf.json").read_text(encoding="utf-8"))["locals"]["shapes"]


# --- reading HCL ----------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """python-hcl2's output without its markers, literal strings unquoted."""
    if isinstance(value, dict):
        return {
            _unquote(k): _clean(v)
            for k, v in value.items()
            if k not in {"__is_block__", "__comments__", "__inline_comments__"}
        }
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return _unquote(value)
    return value


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return json.loads(text)
    return text


def load(directory: Path) -> dict[str, Any]:
    """All .tf files of one module, merged: {"resource": {type: {name: body}}, ...}."""
    merged: dict[str, Any] = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open(encoding="utf-8") as handle:
            parsed = _clean(hcl2.load(handle))
        for kind, entries in parsed.items():
            for entry in entries:
                if kind in {"resource", "data"}:
                    for rtype, named in entry.items():
                        merged.setdefault(kind, {}).setdefault(rtype, {}).update(named)
                elif kind == "locals":
                    merged.setdefault("locals", {}).update(entry)
                elif kind == "provider":
                    merged.setdefault("provider", []).append(entry)
                else:
                    merged.setdefault(kind, {}).update(entry)
    return merged


def shaped(expr: Any) -> Any:
    """A value that only refers to `local.shapes`, resolved against shapes.tf.json."""
    if not isinstance(expr, str):
        return expr
    whole = re.fullmatch(r"\$\{local\.shapes\.(\w+)\}", expr)
    if whole:
        return SHAPES[whole[1]]
    return re.sub(r"\$\{local\.shapes\.(\w+)\}", lambda m: str(SHAPES[m[1]]), expr)


_OPS = {ast.Mult: operator.mul, ast.Add: operator.add}


def evaluate(expr: str, variables: dict[str, int]) -> int:
    """Evaluate a small HCL arithmetic expression (max(), +, *, local.shapes.*, var.*)."""
    body = re.fullmatch(r"\$\{(.*)\}", expr, re.DOTALL)
    assert body, expr
    python = re.sub(r"local\.shapes\.(\w+)", lambda m: str(SHAPES[m[1]]), body[1])
    python = re.sub(r"var\.(\w+)", lambda m: str(variables[m[1]]), python)

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](walk(node.left), walk(node.right)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "max":
            return max(walk(a) for a in node.args)
        raise AssertionError(f"unsupported in {expr!r}: {ast.dump(node)}")

    return walk(ast.parse(python, mode="eval"))


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return load(MODULE)


def resource(tf: dict[str, Any], rtype: str, name: str) -> dict[str, Any]:
    return tf["resource"][rtype][name]


def policy(tf: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return tf["data"]["aws_iam_policy_document"][name]["statement"]


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = body[name]
    return found


# --- the files ------------------------------------------------------------------------------


def test_every_terraform_file_parses():
    files = sorted(TERRAFORM.rglob("*.tf"))
    assert len(files) >= 10
    for path in files:
        with path.open(encoding="utf-8") as handle:
            assert hcl2.load(handle), path
    for path in sorted(TERRAFORM.rglob("*.tf.json")):
        assert json.loads(path.read_text(encoding="utf-8")), path


def test_shapes_file_is_generated_from_the_one_source():
    """`make terraform-shapes` output, committed: editing either side alone fails here."""
    committed = json.loads((MODULE / "shapes.tf.json").read_text(encoding="utf-8"))
    assert committed == shapes.terraform_locals()


def test_example_root_wires_two_regions_into_the_module():
    root = load(EXAMPLE)
    regions = {p["aws"].get("alias"): p["aws"]["region"] for p in root["provider"]}
    assert regions == {None: "${var.region}", "ses": "${var.ses_region}"}
    module = root["module"]["mailflow"]
    assert module["source"] == "../../modules/mailflow"
    # python-hcl2 renders the map's keys and values as expressions, quoted or not.
    wired = {k.strip("${}"): v.strip("${}") for k, v in module["providers"].items()}
    assert wired == {"aws": "aws", "aws.ses": "aws.ses"}
    variables = root["variable"]
    assert variables["ses_region"]["default"] == "us-east-1"
    assert variables["region"]["default"] == "ap-northeast-1"
    assert root["output"]["mailflow"]["value"] == "${module.mailflow.ecspresso}"
    required = load(MODULE)["terraform"]["required_providers"][0]["aws"]
    assert required["configuration_aliases"] == ["${aws.ses}"]


# --- Terraform and `mailflow provision` agree ------------------------------------------------


def test_table_agrees_with_provision(tf, env):
    table = resource(tf, "aws_dynamodb_table", "ledger")
    [attributes] = table["dynamic"]
    attribute = attributes["attribute"]
    assert shaped(attribute["for_each"]) == shapes.KEY_TYPES
    assert attribute["content"] == [{"name": "${attribute.key}", "type": "${attribute.value}"}]
    [gsi] = table["global_secondary_index"]
    declared = {
        "keys": {shaped(table["hash_key"]): "HASH", shaped(table["range_key"]): "RANGE"},
        "attributes": shaped(attribute["for_each"]),
        "index": shaped(gsi["name"]),
        "index_keys": {shaped(gsi["hash_key"]): "HASH", shaped(gsi["range_key"]): "RANGE"},
        "projection": gsi["projection_type"],
        "ttl": shaped(block(table, "ttl")["attribute_name"]),
        "billing": table["billing_mode"],
    }
    assert block(table, "ttl")["enabled"] is True
    assert block(table, "point_in_time_recovery")["enabled"] is True
    assert block(table, "server_side_encryption")["enabled"] is True

    ddb = boto3.client("dynamodb")
    made = ddb.describe_table(TableName=env.settings.table)["Table"]
    [made_gsi] = made["GlobalSecondaryIndexes"]
    ttl = ddb.describe_time_to_live(TableName=env.settings.table)["TimeToLiveDescription"]
    provisioned = {
        "keys": {k["AttributeName"]: k["KeyType"] for k in made["KeySchema"]},
        "attributes": {
            a["AttributeName"]: a["AttributeType"] for a in made["AttributeDefinitions"]
        },
        "index": made_gsi["IndexName"],
        "index_keys": {k["AttributeName"]: k["KeyType"] for k in made_gsi["KeySchema"]},
        "projection": made_gsi["Projection"]["ProjectionType"],
        "ttl": ttl["AttributeName"],
        "billing": made["BillingModeSummary"]["BillingMode"],
    }
    assert declared == provisioned
    # ...and the code queries the index by that name and writes that TTL attribute.
    from mailflow.aws import ledger  # noqa: PLC0415 - the module under test, by name

    assert declared["index"] == ledger.ATTENTION_INDEX
    assert declared["ttl"] == shapes.TTL_ATTRIBUTE


@pytest.mark.parametrize("max_attempts", [1, 3, 4, 5, 34, 100])
def test_redrive_threshold_is_the_same_rule(tf, max_attempts):
    expr = tf["locals"]["max_receive_count"]
    assert evaluate(expr, {"max_attempts": max_attempts}) == (
        Settings(_env_file=None, max_attempts=max_attempts).max_receive_count
    )
    redrive = resource(tf, "aws_sqs_queue", "mail")["redrive_policy"]
    assert re.search(r"maxReceiveCount\s*=\s*local\.max_receive_count\b", redrive), redrive
    assert re.search(r"deadLetterTargetArn\s*=\s*aws_sqs_queue\.dlq\.arn\b", redrive), redrive


def test_queues_agree_with_provision(tf, env):
    settings = env.settings
    queue = resource(tf, "aws_sqs_queue", "mail")
    dlq = resource(tf, "aws_sqs_queue", "dlq")
    assert dlq["name"] == "${local.dlq_name}"
    dlq_name = shaped(tf["locals"]["dlq_name"]).replace("${var.queue_name}", settings.queue)
    assert dlq_name == settings.dlq
    assert queue["name"] == "${var.queue_name}"

    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=settings.queue)["QueueUrl"]
    made = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    redrive = json.loads(made["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(f":{dlq_name}")
    assert redrive["maxReceiveCount"] == evaluate(
        tf["locals"]["max_receive_count"], {"max_attempts": settings.max_attempts}
    )
    # The fixture tunes visibility and wait for speed; the defaults are what Terraform sets.
    defaults = Settings(_env_file=None)
    assert shaped(queue["visibility_timeout_seconds"]) == defaults.visibility_timeout_s
    assert shaped(queue["receive_wait_time_seconds"]) == defaults.wait_time_s
    assert int(made["MessageRetentionPeriod"]) == shaped(queue["message_retention_seconds"])
    dlq_url = sqs.get_queue_url(QueueName=dlq_name)["QueueUrl"]
    made_dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]
    assert int(made_dlq["MessageRetentionPeriod"]) == shaped(dlq["message_retention_seconds"])
    assert queue["sqs_managed_sse_enabled"] is True
    assert dlq["sqs_managed_sse_enabled"] is True
    # Only the topic may send to the queue, in both.
    [made_policy] = json.loads(made["Policy"])["Statement"]
    [statement] = policy(tf, "queue")
    [(test, variables)] = made_policy["Condition"].items()
    condition = block(statement, "condition")
    assert (condition["test"], condition["variable"]) == (test, next(iter(variables)))
    assert statement["actions"] == [made_policy["Action"]]
    assert block(statement, "principals")["identifiers"] == [made_policy["Principal"]["Service"]]


def test_prefixes_agree_with_the_code(tf):
    settings = Settings(_env_file=None)
    rule = resource(tf, "aws_ses_receipt_rule", "mail")
    action = block(rule, "s3_action")
    assert shaped(action["object_key_prefix"]) == settings.incoming_prefix
    lifecycle = resource(tf, "aws_s3_bucket_lifecycle_configuration", "mail")
    [dynamic] = lifecycle["dynamic"]
    archive = shaped(dynamic["rule"]["for_each"])
    assert archive == {
        "processed": settings.processed_prefix,
        "failed": settings.failed_prefix,
        "quarantine": settings.quarantine_prefix,
    }
    assert settings.incoming_prefix not in archive.values()  # incoming/ never expires
    [content] = dynamic["rule"]["content"]
    assert block(content, "filter")["prefix"] == "${rule.value}"
    assert block(content, "expiration")["days"] == "${local.archive_retention_days[rule.key]}"
    retention = tf["locals"]["archive_retention_days"]
    assert retention == {name: f"${{var.{name}_retention_days}}" for name in archive}


# --- SES, S3, KMS, SNS -----------------------------------------------------------------------


def test_ses_rules_scan_and_store_encrypted_with_a_topic(tf):
    rule = resource(tf, "aws_ses_receipt_rule", "mail")
    assert rule["for_each"] == "${var.receipt_rules}"
    assert rule["recipients"] == "${each.value}"
    assert rule["scan_enabled"] is True
    assert rule["tls_policy"] == "${var.tls_policy}"
    action = block(rule, "s3_action")
    assert action["kms_key_arn"] == "${aws_kms_key.mail.arn}"
    assert action["topic_arn"] == "${aws_sns_topic.mail.arn}"
    assert action["bucket_name"] == "${aws_s3_bucket.mail.id}"
    active = resource(tf, "aws_ses_active_receipt_rule_set", "mail")
    assert active["rule_set_name"] == "${aws_ses_receipt_rule_set.mail.rule_set_name}"
    receiving = [
        ("aws_ses_receipt_rule", "mail"),
        ("aws_s3_bucket", "mail"),
        ("aws_kms_key", "mail"),
        ("aws_kms_key", "topic"),
        ("aws_sns_topic", "mail"),
    ]
    for rtype, name in receiving:
        assert resource(tf, rtype, name).get("provider") == "${aws.ses}", f"{rtype}.{name}"
    for rtype, name in [
        ("aws_sqs_queue", "mail"),
        ("aws_dynamodb_table", "ledger"),
        ("aws_kms_key", "main"),
    ]:
        assert "provider" not in resource(tf, rtype, name), f"{rtype}.{name}: main region"
    assert resource(tf, "aws_sns_topic_subscription", "mail")["provider"] == "${aws.ses}"


def _conditions(statement: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    found = {}
    for condition in statement.get("condition", []):
        found[condition["variable"]] = (condition["test"], condition["values"])
    for dynamic in statement.get("dynamic", []):
        if "condition" in dynamic:
            assert dynamic["condition"]["for_each"] == "${local.ses_encryption_context}"
            found["ses_encryption_context"] = ("StringEquals", "local.ses_encryption_context")
    return found


def test_only_ses_of_this_account_and_rule_set_writes_mail(tf):
    block_ = resource(tf, "aws_s3_bucket_public_access_block", "mail")
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls"):
        assert block_[flag] is True
    assert block_["restrict_public_buckets"] is True
    allow, deny = policy(tf, "mail_bucket")
    assert allow["actions"] == ["s3:PutObject"]
    assert allow["resources"] == ["${aws_s3_bucket.mail.arn}/${local.shapes.incoming_prefix}*"]
    assert block(allow, "principals")["identifiers"] == ["ses.amazonaws.com"]
    conditions = _conditions(allow)
    assert conditions["aws:SourceAccount"] == ("StringEquals", ["${local.account}"])
    assert conditions["aws:SourceArn"] == ("ArnLike", "${local.rule_arns}")
    assert deny["effect"] == "Deny"
    assert _conditions(deny)["aws:SecureTransport"] == ("Bool", ["false"])
    # The rule ARNs are this rule set's rules, by the names the rules get.
    rule_arn = tf["locals"]["rule_arns"]
    assert "receipt-rule-set/${var.rule_set_name}:receipt-rule/${var.name}-${rule}" in rule_arn
    assert resource(tf, "aws_ses_receipt_rule", "mail")["name"] == "${var.name}-${each.key}"
    [topic_statement] = policy(tf, "topic")
    assert topic_statement["actions"] == ["sns:Publish"]
    assert _conditions(topic_statement)["aws:SourceArn"] == ("ArnLike", "${local.rule_arns}")


def test_mail_key_binds_every_use_to_the_ses_encryption_context(tf):
    key = resource(tf, "aws_kms_key", "mail")
    assert key["enable_key_rotation"] is True
    statements = {s["sid"]: s for s in policy(tf, "mail_key")}
    assert set(statements) == {
        "AccountAdministers",
        "SesEncryptsThisAccountsMail",
        "WorkersDecryptThisAccountsMail",
    }
    context = {
        "kms:EncryptionContext:aws:ses:source-account": ("StringEquals", ["${local.account}"]),
        "kms:EncryptionContext:aws:ses:rule-name": ("StringEquals", "${local.rule_names}"),
    }
    # Decrypts also need the per-mail part of SES's context (docs/guarantees.md).
    message_id = {"kms:EncryptionContext:aws:ses:message-id": ("Null", ["false"])}
    ses = statements["SesEncryptsThisAccountsMail"]
    assert block(ses, "principals")["identifiers"] == ["ses.amazonaws.com"]
    assert context.items() <= _conditions(ses).items()
    assert _conditions(ses)["aws:SourceAccount"] == ("StringEquals", ["${local.account}"])
    workers = statements["WorkersDecryptThisAccountsMail"]
    assert workers["actions"] == ["kms:Decrypt"]
    assert block(workers, "principals")["identifiers"] == [
        "${aws_iam_role.worker_task.arn}",
        "${aws_iam_role.reconcile_task.arn}",
    ]
    assert _conditions(workers) == context | message_id
    # The role policies use the same context (iam.tf's local), condition by condition.
    assert tf["locals"]["ses_encryption_context"] == {k: v[1] for k, v in context.items()}


def test_topic_is_encrypted_with_a_key_of_its_own(tf):
    assert resource(tf, "aws_sns_topic", "mail")["kms_master_key_id"] == "${aws_kms_key.topic.arn}"
    statements = {s["sid"]: s for s in policy(tf, "topic_key")}
    # SES may use this key (to publish) and no other service: the queue is SSE-SQS, so SNS
    # needs no grant to deliver, and SES's grant never reaches the mail key.
    assert set(statements) == {"AccountAdministers", "SesPublishesToTheTopic"}
    ses = statements["SesPublishesToTheTopic"]
    assert block(ses, "principals")["identifiers"] == ["ses.amazonaws.com"]
    assert _conditions(ses) == {"aws:SourceAccount": ("StringEquals", ["${local.account}"])}


# --- IAM: the only definition of the roles' policies -------------------------------------------


def _actions(statements: list[dict[str, Any]]) -> set[str]:
    return {a for s in statements for a in s["actions"]}


@pytest.mark.parametrize("name", ["worker_task", "reconcile_task", "execution", "scheduler"])
def test_role_policies_have_no_wildcard_actions(tf, name):
    statements = policy(tf, name)
    dynamic = [
        d["statement"]["content"][0]
        for d in tf["data"]["aws_iam_policy_document"][name].get("dynamic", [])
    ]
    for statement in statements + dynamic:
        assert statement.get("effect", "Allow") == "Allow"
        for action in statement["actions"]:
            assert "*" not in action, f"{name}: wildcard action {action}"
        if statement["resources"] == ["*"]:
            assert statement["actions"] == ["ecr:GetAuthorizationToken"], statement
    role = resource(tf, "aws_iam_role_policy", name)
    assert role["policy"] == f"${{data.aws_iam_policy_document.{name}.json}}"


def test_worker_role_is_least_privilege(tf):
    statements = policy(tf, "worker_task")
    actions = _actions(statements)
    assert not any(a.startswith("sns:") for a in actions), "only the SES emulator publishes"
    assert not {"s3:PutObject", "s3:DeleteObject", "dynamodb:DeleteItem", "dynamodb:Scan"} & actions
    assert {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "s3:GetObject",
        "kms:Decrypt",
        "dynamodb:UpdateItem",
    } <= actions
    resources = {r for s in statements for r in s["resources"]}
    assert resources == {
        "${aws_sqs_queue.mail.arn}",
        "${aws_sqs_queue.dlq.arn}",
        "${local.bucket_arn}/${local.shapes.incoming_prefix}*",
        "${local.bucket_arn}",
        "${aws_kms_key.mail.arn}",
        "${aws_dynamodb_table.ledger.arn}",
    }
    [send] = [s for s in statements if "sqs:SendMessage" in s["actions"]]
    assert send["resources"] == ["${aws_sqs_queue.dlq.arn}"]
    [decrypt] = [s for s in statements if "kms:Decrypt" in s["actions"]]
    assert _conditions(decrypt) == {
        "ses_encryption_context": ("StringEquals", "local.ses_encryption_context"),
        "kms:EncryptionContext:aws:ses:message-id": ("Null", ["false"]),
    }


ARCHIVES = (
    '${[for prefix in values(local.shapes.archive_prefixes) : "${local.bucket_arn}/${prefix}*"]}'
)
INCOMING = "${local.bucket_arn}/${local.shapes.incoming_prefix}*"


def test_reconciler_role_writes_only_archives(tf):
    statements = policy(tf, "reconcile_task")
    [put] = [s for s in statements if "s3:PutObject" in s["actions"]]
    assert put["resources"] == ARCHIVES  # every archive prefix of shapes, nothing else
    [delete] = [s for s in statements if "s3:DeleteObject" in s["actions"]]
    assert delete["resources"] == [INCOMING]
    actions = _actions(statements)
    assert "sqs:ReceiveMessage" not in actions
    assert "sqs:DeleteMessage" not in actions
    assert "kms:Decrypt" in actions


# --- scaling, schedule, alarms ----------------------------------------------------------------


def test_scaling_tracks_backlog_per_task_once_the_service_exists(tf):
    target = resource(tf, "aws_appautoscaling_target", "worker")
    assert target["count"] == "${var.worker_service_deployed ? 1 : 0}"
    assert target["resource_id"] == "service/${var.cluster_name}/${var.service_name}"
    assert target["min_capacity"] == "${var.min_tasks}"
    scaling = resource(tf, "aws_appautoscaling_policy", "backlog_per_task")
    config = block(scaling, "target_tracking_scaling_policy_configuration")
    assert config["scale_in_cooldown"] >= config["scale_out_cooldown"]
    metrics_ = {m["id"]: m for m in block(config, "customized_metric_specification")["metrics"]}
    [result] = [m for m in metrics_.values() if m["return_data"]]
    assert result["expression"] == "visible / tasks"
    visible = block(block(metrics_["visible"], "metric_stat"), "metric")
    assert visible["metric_name"] == "ApproximateNumberOfMessagesVisible"
    assert block(visible, "dimensions")["value"] == "${aws_sqs_queue.mail.name}"
    tasks = block(block(metrics_["tasks"], "metric_stat"), "metric")
    assert tasks["namespace"] == "ECS/ContainerInsights"
    assert {d["name"]: d["value"] for d in tasks["dimensions"]} == {
        "ClusterName": "${var.cluster_name}",
        "ServiceName": "${var.service_name}",
    }
    assert tf["variable"]["min_tasks"]["default"] >= 1


def test_schedule_runs_the_reconcile_family_in_the_tasks_network(tf):
    schedule = resource(tf, "aws_scheduler_schedule", "reconcile")
    target = block(schedule, "target")
    ecs = block(target, "ecs_parameters")
    assert ecs["task_definition_arn"].endswith(":task-definition/${local.reconcile_family}")
    network = block(ecs, "network_configuration")
    assert network["subnets"] == "${var.subnet_ids}"
    assert network["security_groups"] == ["${aws_security_group.tasks.id}"]
    assert network["assign_public_ip"] is False
    assert target["role_arn"] == "${aws_iam_role.scheduler.arn}"
    assert tf["locals"]["reconcile_family"] == "${var.name}-reconcile"
    assert TF_OUTPUT["reconcile_family"] == "mailflow-reconcile"


def test_alarms_watch_the_workers_own_metrics(tf):
    alarms = tf["resource"]["aws_cloudwatch_metric_alarm"]
    assert set(alarms) == {
        "dlq_not_empty",
        "oldest_message_age",
        "failure_rate",
        "no_healthy_worker",
    }
    for alarm in alarms.values():
        assert alarm["alarm_actions"] == "${var.alarm_actions}"
    assert alarms["dlq_not_empty"]["dimensions"] == {"QueueName": "${aws_sqs_queue.dlq.name}"}
    assert alarms["no_healthy_worker"]["treat_missing_data"] == "breaching"
    emitted = metrics.emf(
        "mailflow",
        route="store",
        status="failed",
        attempt=1,
        processor_ms=1.0,
        queue_lag_ms=1.0,
        now_ms=0,
    )["_aws"]["CloudWatchMetrics"][0]
    [dynamic] = alarms["failure_rate"]["dynamic"]
    [content] = dynamic["metric_query"]["content"]
    metric = block(content, "metric")
    assert metric["namespace"] == "${var.metrics_namespace}"
    assert tf["variable"]["metrics_namespace"]["default"] == emitted["Namespace"]
    assert metric["metric_name"] in {m["Name"] for m in emitted["Metrics"]}
    assert [list(metric["dimensions"])] in [[d] for d in emitted["Dimensions"]]


# --- ecspresso reads the outputs --------------------------------------------------------------


def test_ecspresso_reads_exactly_what_the_module_outputs(tf):
    declared = tf["output"]["ecspresso"]["value"]
    assert set(declared) == set(TF_OUTPUT), "tests/test_deploy_files.py fakes the same output"
    library = (REPO / "ecspresso" / "mailflow.libsonnet").read_text(encoding="utf-8")
    used = set(re.findall(r"\btf\.(\w+)", library))
    assert used, "mailflow.libsonnet reads the Terraform output"
    assert used <= set(declared), used - set(declared)
    assert "tfstate('output.mailflow')" in library
    assert declared["max_receive_count"] == "${local.max_receive_count}"
    assert declared["max_attempts"] == "${var.max_attempts}"


def test_no_iam_policy_outside_terraform():
    """One source: the roles' policies are in iam.tf only."""
    assert not (REPO / "ecspresso" / "iam").exists()
    for path in (REPO / "ecspresso").rglob("*"):
        if path.is_file():
            assert "PolicyDocument" not in path.read_text(encoding="utf-8"), path


# --- checkov ------------------------------------------------------------------------------------


def _checkov() -> str:
    """checkov lives in its own venv (make .venv-checkov/.installed): it pins boto3/botocore
    versions that clash with aioboto3's."""
    candidates = [
        os.environ.get("MAILFLOW_CHECKOV", ""),
        str(REPO / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    if os.environ.get("CI"):
        pytest.fail("checkov is required in CI (make .venv-checkov/.installed)")
    pytest.skip("no checkov: make .venv-checkov/.installed")
    return ""  # pragma: no cover


SKIP = re.compile(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?")


def test_every_checkov_skip_says_why():
    skips = []
    for path in sorted(TERRAFORM.rglob("*.tf")):
        for line in path.read_text(encoding="utf-8").splitlines():
            match = SKIP.search(line)
            if match:
                skips.append((path.name, match[1], (match[2] or "").strip()))
    assert skips
    for name, check, reason in skips:
        assert len(reason) >= 40, f"{name}: skip of {check} needs a reason"


def test_checkov_passes():
    result = subprocess.run(
        [
            _checkov(),
            "--directory",
            str(TERRAFORM),
            "--framework",
            "terraform",
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"},
    )
    assert result.stdout, result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = reports[0]["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 100
    assert summary["parsing_errors"] == 0
    assert result.returncode == 0
