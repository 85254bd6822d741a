# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A second environment with the oldest versions pyproject.toml allows of bridge's direct
# dependencies, where the tests that use those dependencies run again: the lower bounds hold.
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
# The tests that use the dependencies' APIs, retries and delays on each broker among them; and
# the store outage tests, which rely on how redis-py fails (redis 5.0.1 waited 10 s a call).
LOWEST_TESTS := tests/test_codec.py tests/test_contract.py tests/test_kafka.py tests/test_rabbitmq.py \
	tests/test_retries.py tests/test_idempotency.py tests/test_schema_registry.py \
	tests/test_keys.py::test_keyed_jobs_wait_in_place_while_their_store_does_not_answer \
	tests/test_keys.py::test_keyed_jobs_that_waited_too_long_for_their_store_go_through_the_delay_tiers

.PHONY: demo test lint pytest pytest-lowest pytest-rabbitmq4 pytest-main-kafka pytest-main-rest \
	pytest-lowest-rabbitmq4 pytest-lowest-rest pytest-side-by-side bench brokers down clean

$(STAMP): pyproject.toml
	# (a venv without pip is one whose creation was cut short: made again)
	test -x $(BIN)/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -q -e ".[postgres,redis,registry]" --group test --group lint --group lowest
	touch $(STAMP)

$(LOWEST_STAMP): pyproject.toml $(STAMP)
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(BIN)/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct \
		-e ".[postgres,redis,registry]" --group test
	touch $(LOWEST_STAMP)

brokers: $(STAMP)
	$(BIN)/bridge dev up

down: $(STAMP)
	$(BIN)/bridge dev down
	$(BIN)/python -m tests.rabbitmq4 down

demo: brokers
	$(BIN)/python -m consumers.demo

lint: $(STAMP)
	$(BIN)/ruff check bridge consumers tests bench
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# BRIDGE_LOWEST_BOUNDS makes the session check that it really has the lower bounds.
pytest-lowest: $(LOWEST_STAMP)
	BRIDGE_LOWEST_BOUNDS=1 $(LOWEST)/bin/pytest -p no:cacheprovider $(LOWEST_TESTS)

# The RabbitMQ tests again on RabbitMQ 4.0 (Debian 13's, in a chroot beside the local 3.10:
# tests/rabbitmq4.py); not the dev tools' own, nor the duplicate storms (the same code as on 3.10).
pytest-rabbitmq4: $(STAMP)
	$(BIN)/python -m tests.rabbitmq4 pytest -p no:cacheprovider tests \
		-k "rabbitmq and not test_dev and not test_keys_process"

# The main stage as `make test` runs it, in two sessions at once: the Kafka tests (`-k kafka`)
# under a prefix of their own (their delay tiers and forwarder group apart from the other
# session's), and the rest, every test that uses RabbitMQ among them: some change the whole node
# (a disk alarm, consumer_timeout) and must not reach another session's tests.
pytest-main-kafka: $(STAMP)
	BRIDGE_PREFIX=kafkas $(BIN)/pytest -p no:cacheprovider -k kafka

pytest-main-rest: $(STAMP)
	$(BIN)/pytest -k "not kafka"

# The lowest versions' tests as `make test` runs them, in two sessions: those that use RabbitMQ
# (the registry's too, some of which do without saying so in their names) on RabbitMQ 4, after the
# RabbitMQ 4 stage there, for the same reason; the others on the dev Kafka. Each under a prefix of
# its own.
LOWEST_RABBITMQ := rabbitmq or test_schema_registry
pytest-lowest-rabbitmq4: $(LOWEST_STAMP)
	BRIDGE_LOWEST_BOUNDS=1 BRIDGE_PREFIX=lowestr $(LOWEST)/bin/python -m tests.rabbitmq4 pytest \
		-p no:cacheprovider $(LOWEST_TESTS) -k "$(LOWEST_RABBITMQ)"

pytest-lowest-rest: $(LOWEST_STAMP)
	BRIDGE_LOWEST_BOUNDS=1 BRIDGE_PREFIX=lowest $(LOWEST)/bin/pytest -p no:cacheprovider \
		$(LOWEST_TESTS) -k "not ($(LOWEST_RABBITMQ))"

# Four sessions at once, on two cores: the two halves of the main stage, the RabbitMQ 4 stage and
# then the lowest versions' RabbitMQ tests, and the lowest versions' other tests. Their tests
# mostly wait. The three beside the main stage's rest keep their output in files, shown after.
# (Every session starts the dev services that are down; `bridge dev up` starts each under a lock.
# Each deletes at its end the test queues and topics it made, and those of sessions ended, never
# a running one's: tests/names.py.)
LANES := $(VENV)/pytest-lanes
pytest-side-by-side: $(STAMP) $(LOWEST_STAMP)
	mkdir -p $(LANES)
	{ $(MAKE) --no-print-directory pytest-rabbitmq4; first=$$?; \
	  $(MAKE) --no-print-directory pytest-lowest-rabbitmq4; second=$$?; test $$first = 0 && test $$second = 0; } \
		> $(LANES)/rabbitmq4.log 2>&1 & rabbitmq4=$$!; \
	$(MAKE) --no-print-directory pytest-lowest-rest > $(LANES)/lowest.log 2>&1 & lowest=$$!; \
	$(MAKE) --no-print-directory pytest-main-kafka > $(LANES)/kafka.log 2>&1 & kafka=$$!; \
	$(MAKE) --no-print-directory pytest-main-rest; rest=$$?; \
	wait $$kafka; kafka=$$?; wait $$lowest; lowest=$$?; wait $$rabbitmq4; rabbitmq4=$$?; \
	for lane in kafka rabbitmq4 lowest; do echo "--- $$lane (run beside):"; cat $(LANES)/$$lane.log; done; \
	test $$rest = 0 && test $$kafka = 0 && test $$lowest = 0 && test $$rabbitmq4 = 0

test: lint pytest-side-by-side

# `make bench BENCH_ARGS="--n 20000 --repeat 3"`: bench.throughput's flags (see its --help).
BENCH_ARGS ?=
bench: brokers
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache
