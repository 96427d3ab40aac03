# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE := $(VENV)/.serve
STAMP := $(VENV)/.installed

.PHONY: install serve-install tools run test lint docs image-test format clean bench fuzz soak

# What serving needs, and nothing else: no torch, transformers or test tools.
$(SERVE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu]'
	touch $@

# Everything for the tests and the model tools. The CPU wheel of torch first (it lies on this
# machine's disk), so nothing pulls a CUDA build.
$(STAMP): $(SERVE) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,models,dev,bench,docs]'
	touch $@

serve-install: $(SERVE)

install: $(STAMP)

# Debian's prometheus (promtool) and prometheus-alertmanager (amtool) for the deployment tests,
# nginx as the load balancer of the scaling-out test, chromium for the web page test
# (Playwright drives it; it cannot download its own browser here), wrk (a C load client) for
# `dfine-serve bench --wrk` and its test. apt-get needs root, as CI has.
# GStreamer's RTSP server, its Python bindings and plugins for the stream tests' camera (they
# bind to Debian's /usr/bin/python3: tests/video/rtsp_server.py).
# podman, runc and mmdebstrap build and run the images in tests/containers (docker/stand-ins.sh);
# the dnsname plugin lets compose's services find each other by name on podman's networks.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v amtool >/dev/null && command -v chromium >/dev/null \
	  && command -v podman >/dev/null && command -v mmdebstrap >/dev/null \
	  && PATH="$$PATH:/usr/sbin" command -v runc >/dev/null && test -x /usr/lib/cni/dnsname \
	  && PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null && command -v wrk >/dev/null \
	  && /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null \
	  && gst-inspect-1.0 rtph264pay >/dev/null 2>&1 || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager nginx chromium podman runc mmdebstrap uidmap wrk \
	    python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools gstreamer1.0-plugins-base \
	    gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
	    golang-github-containernetworking-plugin-dnsname >/dev/null; }

run: $(SERVE)
	$(PY) -m app

lint: $(STAMP)
	$(VENV)/bin/ruff check app models tests
	$(VENV)/bin/mypy

# The documentation site, from docs/ (the settings page generated from app/config.py); strict:
# a broken link, a missing page or a stale anchor fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: lint docs tools
	$(PY) -m pytest

# The images, built and run for real (also part of `make test`'s pytest run).
image-test: $(STAMP) tools
	$(PY) -m pytest tests/containers

# Longer runs than CI's: the decode fuzzer for 5 minutes, the soak at 20,000 requests.
fuzz: $(STAMP)
	$(PY) tests/fuzz/fuzz_decode.py build/fuzz-corpus -max_total_time=300

soak: $(STAMP)
	$(PY) -m tests.soak --requests 20000

bench: $(SERVE)
	$(PY) -m app bench --concurrency 1,8,32 --repeat 3 --overload 64 --out build/bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix app models tests

clean:
	rm -rf $(VENV) build *.egg-info
