#!/usr/bin/env bash
# The real converge: boot a Debian bookworm systemd container (systemd-nspawn), provision it
# with ansible/site.yml, and check what operators rely on: the service is active and answers
# C-ECHO (plain, and over DICOM TLS with a certificate the role provisioned as a credential), a
# second run changes nothing, SIGKILL leads to a restart, stop is clean, the journal has the
# appliance's structured lines, and the sandboxed codecs render a JPEG 2000 image.
#
# Run as root: `just test-deploy-live`. The rootfs is built once (mmdebstrap) and cached in
# $SGW_ROOTFS (default /var/cache/screening-gateway-deploy/bookworm-<hash of its packages>); each run boots it with
# --volatile=overlay, so the cache stays clean and every run starts from a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
venv=$repo/.venv/bin
# The packages the roles install are already in the image: the container has no network of its
# own, so the roles' apt tasks find them present (as on a site with a local mirror).
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,python3-packaging,nftables,chrony,unattended-upgrades,openssh-server,ca-certificates
rootfs=${SGW_ROOTFS:-/var/cache/screening-gateway-deploy/bookworm-$(echo "$packages" | sha256sum | cut -c1-12)}
work=$(mktemp -d /tmp/sgw-live.XXXXXX)
machine=sgw-live-$$
failures=0

step() { printf '\n== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
inside() { nsenter --target "$leader" --all -- "$@"; }
in_net() { nsenter --target "$leader" --net -- "$@"; }

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v echoscu >/dev/null || need+=(dcmtk)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$rootfs/lib/systemd/systemd" ]; then
    step "building the bookworm rootfs in $rootfs (once)"
    mkdir -p "$(dirname "$rootfs")"
    mmdebstrap --variant=minbase --include="$packages" bookworm "$rootfs.new" http://deb.debian.org/debian
    mv "$rootfs.new" "$rootfs"
fi

step "building the release wheelhouse (just build)"
just build >/dev/null

cleanup() {
    # $! of a backgrounded function is its subshell: stop the program it started too.
    for pid in ${emulator:-} ${consumer:-}; do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    if [ -n "${nspawn:-}" ] && kill -0 "$nspawn" 2>/dev/null; then
        kill -TERM "$nspawn" 2>/dev/null || true  # nspawn shuts the container down cleanly
        for _ in $(seq 50); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step "booting $machine"
systemd-nspawn --directory="$rootfs" --volatile=overlay --boot --register=no --keep-unit \
    --private-network --machine="$machine" --console=passive >"$work/console.log" 2>&1 &
nspawn=$!
leader=
for _ in $(seq 100); do
    leader=$(pgrep -P "$nspawn" -x systemd || true)
    [ -n "$leader" ] && break
    sleep 0.2
done
[ -n "$leader" ] || { cat "$work/console.log"; echo "container did not boot"; exit 1; }
state=$(timeout 60 nsenter --target "$leader" --all -- systemctl is-system-running --wait || true)
echo "container leader pid $leader, system $state"

step "relay emulator inside the container's network"
printf 'live-test-relay-key' >"$work/relay.key"
in_net "$venv/appliance-dev" relay-emulator --host 127.0.0.1 --port 9400 \
    --key-file "$work/relay.key" >"$work/emulator.log" 2>&1 &
emulator=$!

step "the site's PKI: a CA, the gateway's certificate, a unit's client certificate (openssl)"
pki=$work/pki
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=live-site-ca -keyout "$pki/ca.key" \
    -out "$pki/ca.crt" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign 2>/dev/null
for leaf in gateway unit; do
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$leaf" -keyout "$pki/$leaf.key" \
        -out "$pki/$leaf.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$pki/$leaf.ext"
    openssl x509 -req -in "$pki/$leaf.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 20 -extfile "$pki/$leaf.ext" -out "$pki/$leaf.crt" 2>/dev/null
done

step "inventory (relay key and TLS key from Ansible Vault)"
mkdir -p "$work/inventory/host_vars/$machine"
head -c 24 /dev/urandom | base64 >"$work/vault-pass"
cat >"$work/inventory/hosts.yml" <<YAML
screening_gateways:
  hosts:
    $machine:
      ansible_connection: community.docker.nsenter
      ansible_nsenter_pid: $leader
      ansible_become: false  # nsenter already runs as root
YAML
cat >"$work/inventory/host_vars/$machine/main.yml" <<YAML
screening_gateway_modalities:
  - {name: Test unit, ae_title: LIVE_MG1, address: 127.0.0.1}
screening_gateway_peers:
  - {name: TLS unit, ae_title: LIVE_MG2, addresses: [127.0.0.1], client_certificate: ca}
screening_gateway_tls_enabled: true
screening_gateway_tls_certificate: "{{ lookup('file', '$pki/gateway.crt') }}"
screening_gateway_tls_key: "{{ vault_tls_key }}"
screening_gateway_tls_ca: "{{ lookup('file', '$pki/ca.crt') }}"
screening_gateway_relay_enabled: true
screening_gateway_relay_namespace: "127.0.0.1:9400"
screening_gateway_relay_endpoint: ws://127.0.0.1:9400
screening_gateway_relay_key: "{{ vault_relay_key }}"
host_hardening_ntp_servers: []
YAML
"$venv/ansible-vault" encrypt_string --vault-password-file "$work/vault-pass" \
    --name vault_relay_key "$(cat "$work/relay.key")" >"$work/inventory/host_vars/$machine/vault.yml" 2>/dev/null
"$venv/ansible-vault" encrypt_string --vault-password-file "$work/vault-pass" \
    --name vault_tls_key "$(cat "$pki/gateway.key")" >>"$work/inventory/host_vars/$machine/vault.yml" 2>/dev/null

converge() {
    (cd ansible && ANSIBLE_FORCE_COLOR=0 "$venv/ansible-playbook" -i "$work/inventory" site.yml \
        --vault-password-file "$work/vault-pass") >"$work/converge-$1.log" 2>&1
}

step "first converge"
if converge 1; then pass "first converge"
else tail -40 "$work/converge-1.log"; echo "FAIL  first converge"; exit 1; fi
grep -A2 "PLAY RECAP" "$work/converge-1.log" || true
if grep -q "relay-key\|$(cat "$work/relay.key")" "$work/converge-1.log"; then
    grep -n "$(cat "$work/relay.key")" "$work/converge-1.log" | head -3
    fail "the relay key appears in the converge output"
else
    pass "the relay key appears nowhere in the converge output"
fi
if grep -q "PRIVATE KEY\|$(sed -n 2p "$pki/gateway.key")" "$work/converge-1.log"; then
    fail "the TLS key appears in the converge output"
else
    pass "the TLS key appears nowhere in the converge output"
fi

step "second converge"
converge 2 || { tail -40 "$work/converge-2.log"; fail "second converge"; }
recap=$(grep -A1 "PLAY RECAP" "$work/converge-2.log" | tail -1)
echo "$recap"
if [[ $recap == *"changed=0"* && $recap == *"failed=0"* ]]; then
    pass "second converge reports changed=0"
else
    grep -B3 "^changed:" "$work/converge-2.log" | head -40
    fail "second converge changed something"
fi

wait_active() {  # wait_active OLD_MAIN_PID: active with a main PID other than OLD_MAIN_PID
    for _ in $(seq 150); do
        local pid
        pid=$(inside systemctl show -P MainPID screening-gateway)
        if [ "$(inside systemctl is-active screening-gateway || true)" = active ] \
            && [ "$pid" != 0 ] && [ "$pid" != "$1" ]; then
            echo "$pid"; return 0
        fi
        sleep 0.2
    done
    return 1
}

step "service"
if main=$(wait_active 0); then pass "active (Type=notify: READY=1 once both ports listen), pid $main"
else inside systemctl status screening-gateway --no-pager | tail -20; fail "service not active"; fi
if in_net /usr/bin/echoscu -aet LIVE_MG1 -aec SCREENING_PACS 127.0.0.1 4244 \
    && in_net /usr/bin/echoscu -aet LIVE_MG1 -aec SCREENING_MWL 127.0.0.1 4243; then
    pass "C-ECHO answered on the storage and worklist ports"
else
    fail "C-ECHO"
fi
tls_unit=(+tls "$pki/unit.key" "$pki/unit.crt" +cf "$pki/ca.crt")
if in_net /usr/bin/echoscu -aet LIVE_MG2 -aec SCREENING_PACS "${tls_unit[@]}" 127.0.0.1 2762 \
    && in_net /usr/bin/echoscu -aet LIVE_MG2 -aec SCREENING_MWL "${tls_unit[@]}" 127.0.0.1 2763; then
    pass "C-ECHO over DICOM TLS (mutual, the site CA) on 2762 and 2763, credentials by LoadCredential"
else
    inside journalctl -u screening-gateway --no-pager -o cat | grep -i "tls\|refused" | tail -5 || true
    fail "TLS C-ECHO"
fi
if in_net /usr/bin/echoscu -aet LIVE_MG2 -aec SCREENING_PACS +tla +cf "$pki/ca.crt" 127.0.0.1 2762 2>/dev/null; then
    fail "a mutual-TLS peer was let in without its certificate"
else
    pass "the mutual-TLS peer without a client certificate is refused"
fi
# (Captured first: with pipefail, `nft ... | grep -q` fails whenever grep exits before nft.)
table=$(inside nft list table inet screening_gateway || true)
if [[ $table == *"127.0.0.1"* && $table == *"drop"* ]]; then
    pass "nftables: DICOM ports accept the modality addresses, drop the rest"
else
    echo "$table"; fail "nftables table"
fi

step "a JPEG 2000 mammogram through the sandboxed pipeline (MemoryDenyWriteExecute)"
"$venv/python" - "$work" <<'PY'
import sys
from pathlib import Path
from pydicom import uid
from appliance.testing.synthetic import mammogram
from tests.support import encode
work = Path(sys.argv[1])
mammogram(shape=(512, 400)).save_as(work / "plain.dcm", enforce_file_format=True)
encode(work / "plain.dcm", work / "j2k.dcm", uid.JPEG2000Lossless)
PY
# pynetdicom as the modality: it proposes the file's own transfer syntax.
if in_net "$venv/python" -c 'import sys; from pathlib import Path; from tests.support import send_files
[status] = send_files(4244, [Path(sys.argv[1])], calling="LIVE_MG1")
sys.exit(0 if status is not None and status.Status == 0 else 1)' "$work/j2k.dcm"; then
    pass "C-STORE of a JPEG 2000 image: Success"
else
    fail "C-STORE"
fi
thumbs=0
for _ in $(seq 100); do
    thumbs=$( (inside find /var/lib/private/screening-gateway/derived -name '*.jpg' 2>/dev/null || true) | wc -l)
    [ "$thumbs" -gt 0 ] && break
    sleep 0.2
done
if [ "$thumbs" -gt 0 ]; then pass "thumbnail rendered under the unit's sandbox ($thumbs files)"
else fail "no thumbnail"; fi

step "relay"
connected=no
for _ in $(seq 50); do
    if inside /opt/screening-gateway/bin/appliance status --json \
        --config /etc/screening-gateway/appliance.toml 2>/dev/null | python3 -c \
        'import json, sys; sys.exit(0 if json.load(sys.stdin)["relay"]["listener"]["connected"] else 1)'
    then connected=yes; break; fi
    sleep 0.2
done
if [ $connected = yes ]; then pass "relay listener connected with the vaulted key (LoadCredential)"
else inside /opt/screening-gateway/bin/appliance status --config /etc/screening-gateway/appliance.toml || true
    fail "relay not connected"; fi

step "appliance selftest on the provisioned host (the cloud acknowledging through the emulator)"
cat >"$work/cloud.toml" <<TOML
[relay]
enabled = true
namespace = "127.0.0.1:9400"
endpoint = "ws://127.0.0.1:9400"
key_file = "$work/relay.key"
TOML
in_net "$venv/appliance-dev" --config "$work/cloud.toml" cloud events >"$work/cloud-events.log" 2>&1 &
consumer=$!
if inside /opt/screening-gateway/bin/appliance selftest --timeout 30 \
    --config /etc/screening-gateway/appliance.toml >"$work/selftest.log" 2>&1; then
    pass "selftest passed: $(grep -c ' ok ' "$work/selftest.log") phases ok, events acknowledged"
else
    cat "$work/selftest.log"; fail "selftest"
fi
pkill -TERM -P "$consumer" 2>/dev/null || true; kill "$consumer" 2>/dev/null || true

step "systemctl kill -s KILL"
restarts=$(inside systemctl show -P NRestarts screening-gateway)
inside systemctl kill -s KILL screening-gateway
if new=$(wait_active "$main"); then
    pass "restarted after SIGKILL: pid $main -> $new, NRestarts $restarts -> $(inside systemctl show -P NRestarts screening-gateway)"
else
    fail "no restart after SIGKILL"
fi

step "systemctl stop"
started=$(date +%s.%N)
inside systemctl stop screening-gateway
took=$(echo "$(date +%s.%N) - $started" | bc)
result=$(inside systemctl show -P Result screening-gateway)
status=$(inside systemctl show -P ExecMainStatus screening-gateway)
if [ "$result" = success ] && [ "$status" = 0 ]; then
    pass "stopped cleanly in ${took}s (Result=$result, exit status $status)"
else
    fail "stop: Result=$result ExecMainStatus=$status"
fi

step "journal"
inside journalctl -u screening-gateway --no-pager -o cat >"$work/journal.log"
events=$(grep -c ' event=' "$work/journal.log" || true)
grep ' event=' "$work/journal.log" | head -5 || true
if [ "$events" -gt 0 ]; then pass "journalctl -u screening-gateway: $events structured event lines"
else head -20 "$work/journal.log"; fail "no structured lines in the journal"; fi
if grep -q "TEST^PARTICIPANT\|9990000001" "$work/journal.log"; then
    fail "patient identifiers in the journal"
else
    pass "no patient name or ID in the journal"
fi

step "summary"
if ((failures)); then echo "$failures check(s) failed"; exit 1; fi
echo "all checks passed"
