# kafscribe: `make up` runs the whole pipeline locally, `make test` passes the tests.
# Both install everything they need first (venv, Python packages, ffmpeg/espeak-ng, server jars).

PYTHON     ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
BIN        := $(VENV)/bin
# Wheels are kept here across clones: PyPI's torch is a multi-GB CUDA build.
WHEELHOUSE ?= $(HOME)/.cache/kafscribe/wheels
EXTRAS     ?= dev,models
PYTEST_ARGS ?=

.PHONY: up down status test test-fast lint docs install system-deps services-up services-down bench soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@mkdir -p $(WHEELHOUSE)
	@echo "== filling the wheel cache $(WHEELHOUSE) (only new files are downloaded)"
	$(BIN)/pip wheel -q -w $(WHEELHOUSE) --find-links $(WHEELHOUSE) ".[$(EXTRAS)]"
	@rm -f $(WHEELHOUSE)/kafscribe-*.whl
	$(BIN)/pip install -q --find-links $(WHEELHOUSE) -e ".[$(EXTRAS)]"
	@touch $@

system-deps:
	@missing=""; for tool in ffmpeg ffprobe espeak-ng chromium; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "== installing Debian packages for:$$missing (ffmpeg decodes audio, espeak-ng speaks test clips, chromium renders /docs in a test)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng chromium >/dev/null; \
	  else echo "kafscribe needs ffmpeg, espeak-ng and chromium: run 'sudo apt-get install ffmpeg espeak-ng chromium'" >&2; exit 1; fi; \
	fi
	@# Prometheus: `kafscribe services up` runs its own instance (our config, data in .kafscribe/prometheus);
	@# the Debian package's daemon must not run (it would hold 9090), and --no-install-recommends keeps
	@# prometheus-node-exporter (port 9100, the supervisor's) out. chromium: the UI screenshot test/docs.
	@missing=""; for tool in prometheus promtool chromium; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "== installing Debian packages for:$$missing (Prometheus scrapes the services; chromium renders its UI)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null; \
	    (service prometheus stop; systemctl disable --now prometheus) >/dev/null 2>&1 || true; \
	  else echo "kafscribe needs prometheus and chromium: run 'sudo apt-get install --no-install-recommends prometheus chromium && sudo systemctl disable --now prometheus'" >&2; exit 1; fi; \
	fi
	@command -v java >/dev/null || { echo "kafscribe needs Java 17 (Kafka and Cassandra run on it)" >&2; exit 1; }
	@command -v mvn  >/dev/null || { echo "kafscribe needs Maven 3.8+ (it fetches the Kafka and Cassandra jars)" >&2; exit 1; }

up: install system-deps
	$(BIN)/kafscribe stack up
	$(BIN)/kafscribe models prepare
	$(BIN)/kafscribe services up
	@echo "kafscribe is up: ingress on http://127.0.0.1:8000, services supervised (kafscribe services status; make down to stop)"
	@echo "Prometheus: http://127.0.0.1:9090 (targets: /classic/targets, alerts: /classic/alerts; lag exporter on :9105)"
	@key=$$($(BIN)/kafscribe keys local | tail -n 1) || exit 1; \
	echo "local API key (admin, tenant 'default'; kept in .kafscribe/local-api-key, new keys: kafscribe keys create):"; \
	echo "  export KAFSCRIBE_API_KEY=$$key"; \
	echo '  curl -H "Authorization: Bearer $$KAFSCRIBE_API_KEY" -F file=@clip.wav localhost:8000/v1/jobs'; \
	echo "  $(BIN)/kafscribe submit clip.wav --wait"

down:
	-$(BIN)/kafscribe services down
	$(BIN)/kafscribe stack down

status:
	$(BIN)/kafscribe stack status; $(BIN)/kafscribe services status

# ruff, then the import contract (tests/unit/test_layers.py): layers go one way, no package cycle.
lint: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider tests/unit/test_layers.py

# The unit tests: no servers, a couple of minutes. Run them every minute; `make test` runs everything.
test-fast: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# docs/settings.md is generated from kafscribe/settings.py (tests/unit/test_docs.py checks it is current).
docs: install
	$(BIN)/kafscribe settings --markdown > docs/settings.md

# Two pytest processes side by side. The side group (`-m side`: the cluster group on 127.0.0.2-4, the soak, the
# broker and Cassandra outage drills; mostly waiting on drills) runs on a test stack of its own (ports +1000, its own
# state directory) beside everything else. Run one after the other they kept the 2-core machine ~60 % busy; side
# by side saves the side group's minutes. Models are prepared first: both processes would convert them.
SIDE_LOG := .kafscribe/test-side-group.log
test: install system-deps lint
	$(BIN)/python -m infra.jars
	$(BIN)/kafscribe models prepare >/dev/null
	@mkdir -p .kafscribe
	@echo "== the side group runs beside the rest; its output follows theirs ($(SIDE_LOG))"
	@KAFSCRIBE_TEST_PORT_OFFSET=$$(( $${KAFSCRIBE_TEST_PORT_OFFSET:-0} + 1000 )) \
	KAFSCRIBE_TEST_STATE_DIR="$(CURDIR)/.kafscribe/test-stack-side" \
	$(BIN)/pytest -p no:cacheprovider -m side $(PYTEST_ARGS) > $(SIDE_LOG) 2>&1 & side=$$!; \
	$(BIN)/pytest -m "not side" $(PYTEST_ARGS); rest=$$?; \
	wait $$side; group=$$?; \
	echo "== the side group (exit $$group)"; cat $(SIDE_LOG); \
	test $$rest -eq 0 && test $$group -eq 0

bench: install
	$(BIN)/python -m bench.pipeline

# The soak drill (docs/testing.md): 20 min of uploads, a service SIGKILLed every minute. Needs the stack of
# this checkout (`kafscribe stack up`: the drill kills and restarts its broker); SOAK_ARGS="--seed 2" etc.
SOAK_ARGS ?=
soak: install
	$(BIN)/python -m bench.soak --minutes 20 --kill-every 60 $(SOAK_ARGS)

clean: down
	rm -rf .kafscribe
