# corral: `make demo` runs the main job, `make test` the tests.  Both run
# `make setup` first, which installs what is missing and is safe to re-run.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
KERNEL := $(shell uname -r)
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
BUILD := build
VMLINUX := $(BUILD)/$(KERNEL)/vmlinux.h
BPF_OUT := src/corral/_bpf
BPF_OBJS := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(wildcard bpf/*.bpf.c))
APT_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool bubblewrap iproute2 nftables procps \
	socat nmap ncat openssh-server openssh-client curl wget autossh python3-venv python3-dev python3-pip git gcc make

# Only the tests need a browser (the web console is tested in a real headless Chromium).
TEST_APT_PACKAGES := chromium

.PHONY: setup deps test-deps apt-install mounts demo test lint bench clean

setup: deps $(VENV)/.installed $(BPF_OBJS) mounts

deps:
	@$(MAKE) -s apt-install PACKAGES="$(APT_PACKAGES)"

test-deps:
	@$(MAKE) -s apt-install PACKAGES="$(TEST_APT_PACKAGES)"

apt-install:
	@missing=$$(for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@echo "setup: creating $(VENV) and installing corral into it"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# vmlinux.h describes the running kernel's types (CO-RE); one per kernel release.
$(VMLINUX):
	@mkdir -p $(dir $@)
	@echo "setup: generating $@ from /sys/kernel/btf/vmlinux"
	@bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

# Every bpf/NAME.bpf.c becomes src/corral/_bpf/NAME.bpf.o (package data).
$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c $(wildcard bpf/*.h) $(VMLINUX)
	@mkdir -p $(dir $@)
	@echo "setup: compiling $<"
	@clang -O2 -g -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
		-I$(BUILD)/$(KERNEL) -Ibpf -c $< -o $@.tmp && mv $@.tmp $@

mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

demo: setup
	$(BIN)/corral demo

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/mypy

test: lint test-deps
	@$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(BUILD) $(VENV) $(BPF_OUT)
