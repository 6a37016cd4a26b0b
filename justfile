# Screening gateway appliance: `just --list` is the help. CI runs these same recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env("PYTHON", "python3")
venv := ".venv"
bin := venv / "bin"

# Debian packages the tests, benches, chaos and live checks drive the appliance with (one list):
# dcmtk, Orthanc, dicom3tools and OpenJPEG are the peers and encoders; systemd for the unit
# gates; fuse3 + libfuse3-dev + pkg-config + gcc for the power-cut filesystem (pyfuse3);
# e2fsprogs for the loop-mounted ext4 disks; systemd-container + mmdebstrap for the live converge;
# openssl for the tests' PKI and rsyslog + rsyslog-openssl as the remote audit repository.
deb_packages := "python3-venv dcmtk orthanc dicom3tools libopenjp2-tools systemd systemd-container mmdebstrap fuse3 libfuse3-dev pkg-config gcc e2fsprogs openssl rsyslog rsyslog-openssl"

# Install the Debian packages above that are missing (as root), or print the command that would
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    for package in {{deb_packages}}; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && exit 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: missing Debian packages; run: sudo apt-get install -y ${missing[*]}" >&2
        exit 0  # the tests that need them say which one is missing
    fi
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null

# Create .venv and install the project with its dev tools (skipped when pyproject.toml is unchanged)
bootstrap:
    @if [ ! -x {{bin}}/python ]; then {{python}} -m venv {{venv}}; fi
    @if [ ! -f {{venv}}/.installed ] || [ pyproject.toml -nt {{venv}}/.installed ]; then \
        {{bin}}/pip install --quiet --upgrade pip && \
        {{bin}}/pip install --quiet -e '.[dev]' && touch {{venv}}/.installed; fi

# Run the appliance on the embedded local config (state under ./var/, ports 4244 and 4243)
run *ARGS: bootstrap
    {{bin}}/appliance run --config config/local.toml {{ARGS}}

# Lint and format check, then the whole test suite
test *ARGS: deps bootstrap lint test-deploy
    {{bin}}/pytest {{ARGS}}

# The tests that do not start the appliance as a process: seconds, for the edit-test loop
test-fast *ARGS: bootstrap
    {{bin}}/pytest -m "not system" {{ARGS}}

# ruff lint and format check, and mypy (strict on appliance/)
lint: bootstrap
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy

# Rewrite formatting and apply safe lint fixes
fmt: bootstrap
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# The release wheelhouse for Ansible: the appliance's wheel and every runtime dependency
build: bootstrap
    rm -rf dist/wheelhouse
    {{bin}}/pip wheel --quiet --wheel-dir dist/wheelhouse . 2>&1 | { grep -v "is ignored: it is neither" || true; }
    @ls dist/wheelhouse/screening_gateway-*.whl

# Static deployment gates: ansible-lint (production profile) and the playbook's syntax check
test-deploy: bootstrap
    cd ansible && PATH="$PWD/../{{bin}}:$PATH" ansible-lint --profile production --offline
    cd ansible && PATH="$PWD/../{{bin}}:$PATH" ansible-playbook -i inventory/example site.yml --syntax-check

# Provision a booted Debian systemd container with site.yml and check the running service (root)
test-deploy-live: bootstrap
    PATH="$PWD/{{bin}}:$PATH" bash tests/deploy/live.sh

# Benchmarks against dcmtk peers on the same data, same run (prints ratios)
bench *ARGS: bootstrap
    {{bin}}/python -m tests.bench {{ARGS}}

# Faults and load against the real appliance, a table of figures (--long for the full form; root)
chaos *ARGS: bootstrap
    @mkdir -p var
    @{{bin}}/python -c "import pyfuse3" 2>/dev/null || {{bin}}/pip install --quiet -e '.[dev,chaos]'
    {{bin}}/python -m tests.chaos {{ARGS}}

# The whole round trip with real processes: relay emulator, appliance, cloud, a simulated unit
demo *ARGS: bootstrap
    {{bin}}/python -m appliance.testing.{{ if ARGS == "--profile manage" { "demo_manage" } else { "demo" } }}
