# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= data/synthetic
RUNS   ?= runs/demo
# when make began: the demo's 15-minute budget counts the install and the data too
START  := $(shell date +%s)

.PHONY: demo test test-fast data bench-quick gpu-check clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

$(DATA)/DL_info.csv: | $(VENV)/.installed
	$(PY) -m lesion_fastai.synthetic --out $(DATA) --patients 250 --size 256 --seed 0 --workers 2

data: $(DATA)/DL_info.csv

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

# headless Chromium for the test that opens report.html in a browser (Debian's package); where it cannot be
# installed (no root, no apt), that test skips and says why
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  timeout 600 $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { timeout 300 $$SUDO apt-get update -q >/dev/null 2>&1 && timeout 600 $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed here: the browser test will skip"; }

# the tests that train nothing end to end (pytest -m 'not slow'): about half a minute
test-fast: $(VENV)/.installed browser
	$(PY) -m pytest -q -m 'not slow'

demo: $(VENV)/.installed $(DATA)/DL_info.csv
	$(PY) -m lesion_fastai.demo --data $(DATA) --out $(RUNS) --started $(START)

bench-quick: $(VENV)/.installed
	$(PY) -m lesion_fastai.bench efficiency --quick
	$(PY) -m lesion_fastai.bench throughput --quick

# the GPU path in figures (a few minutes on one GPU): bf16 training, inference, loaders with workers, peak memory
gpu-check: $(VENV)/.installed
	$(PY) -m lesion_fastai.bench gpu

clean:
	rm -rf $(RUNS)
