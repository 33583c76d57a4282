# mailflow: the two commands that matter are `make run` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
S3EC    := .venv-s3ec/.installed
# checkov pins boto3/botocore versions that clash with aioboto3's: a venv of its own.
CHECKOV_VENV  ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
LINTED  := src tests examples $(wildcard bench)

.PHONY: run test installs lint typecheck unit chaos bench backends clean terraform-shapes

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The lock pins the whole tree (aioboto3 ↔ aiobotocore ↔ botocore ↔ moto move together).
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,test]'
	touch $(STAMP)

# AWS's S3 encryption client for the compatibility tests: its pins conflict with ours.
$(S3EC): tests/compat/requirements-s3ec.txt
	$(PY) -m venv .venv-s3ec
	.venv-s3ec/bin/pip install --quiet --upgrade pip
	.venv-s3ec/bin/pip install --quiet --no-deps -r tests/compat/requirements-s3ec.txt
	touch $(S3EC)

$(CHECKOV_STAMP): requirements-checkov.lock
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet -r requirements-checkov.lock
	touch $(CHECKOV_STAMP)

## terraform-shapes: regenerate the Terraform module's copy of mailflow.aws.shapes
terraform-shapes: $(STAMP)
	$(BIN)/python -c "from pathlib import Path; from mailflow.aws import shapes; shapes.write_terraform_locals(Path('infra/terraform/modules/mailflow/shapes.tf.json'))"

# The second backend (dynalite for DynamoDB, LocalStack for S3/SQS/SNS), installed outside the
# repository's tracked files; the stamps name the versions, so a bump reinstalls.
MAILFLOW_BACKENDS_DIR ?= var
DYNALITE     := dynalite@4.0.0
LOCALSTACK   := 'localstack-core[runtime]==4.13.1' 'cbor2<6' pyopenssl==25.3.0 service_identity
NODE_STAMP   := $(MAILFLOW_BACKENDS_DIR)/node/.installed-$(DYNALITE)
LS_VENV      := $(MAILFLOW_BACKENDS_DIR)/localstack-venv
LS_STAMP     := $(LS_VENV)/.installed-4.13.1

## backends: install dynalite (npm) and LocalStack (own venv) for the second-backend tests
backends: $(NODE_STAMP) $(LS_STAMP)

$(NODE_STAMP):
	mkdir -p $(MAILFLOW_BACKENDS_DIR)/node
	test -f $(MAILFLOW_BACKENDS_DIR)/node/package.json \
		|| echo '{"private": true}' > $(MAILFLOW_BACKENDS_DIR)/node/package.json
	npm install --prefix $(MAILFLOW_BACKENDS_DIR)/node --no-audit --no-fund --loglevel=error $(DYNALITE)
	touch $@

# Its own venv: LocalStack pins versions (boto, werkzeug, ...) that conflict with ours.
$(LS_STAMP):
	$(PY) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet $(LOCALSTACK)
	touch $@

## run: the embedded default: moto server, provision, worker, sample mails (Ctrl-C stops)
run: $(STAMP)
	$(BIN)/mailflow dev

# pytest-xdist processes. Most tests wait on servers and subprocesses, so more workers than
# the 2 cores we plan for overlap those waits; `make test TEST_WORKERS=0` runs in one process.
# Work stealing: an idle worker takes half of a busy one's queue (with `--dist load` a worker
# was handed a block of long end-to-end tests and ran alone for the last ~3 of ~6.5 minutes).
# On the 2-core machine, pytest alone: 3 workers 293 s, 4 workers 258-274 s, 5 workers 241 s.
# The unit tests keep busy the one core they have: two workers save a second of ~18 and
# double their CPU, so `make unit` runs in one process unless UNIT_WORKERS says otherwise.
TEST_WORKERS ?= 5
UNIT_WORKERS ?= 0

## installs: the three venvs the tests use (`make -j3 installs` builds them side by side)
installs: $(STAMP) $(S3EC) $(CHECKOV_STAMP)

## test: lint, type check, and the whole test suite (unit, contract on every backend, e2e, deploy)
# The three venvs install side by side, lint and type check start as soon as the main one is
# there (one make with -j: what does not depend on each other runs at once), then pytest.
test:
	$(MAKE) --no-print-directory -j4 -Otarget installs lint typecheck
	# Where PYTHONDONTWRITEBYTECODE is set, every `python -m mailflow` the tests start would
	# compile src/ again: compile it once (up-to-date files are skipped).
	$(BIN)/python -m compileall -q src >/dev/null
	MAILFLOW_CHECKOV=$(CHECKOV_VENV)/bin/checkov \
		$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal

## unit: pure logic and the logic on in-memory fakes (contract suite on the fakes): no server, no php
unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n $(UNIT_WORKERS) -m "not server" tests/unit tests/contract

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy

## chaos: the full chaos run (≥ 300 deliveries, kills, faults); prints one summary line
chaos: $(STAMP)
	$(BIN)/python tests/chaos/run.py --deliveries 300 --workers 2 --kills 4

## bench: throughput / CPU / latency / RSS against a naive consumer, same run, same backend
bench: $(STAMP) backends
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .venv-s3ec $(CHECKOV_VENV) var .pytest_cache .mypy_cache .ruff_cache
