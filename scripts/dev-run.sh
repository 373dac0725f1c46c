#!/usr/bin/env bash
# Sets up a local TLS-only RabbitMQ with certificate login and a throwaway PKI under ./dev,
# then runs the agent in the foreground against it. Re-running reuses what exists.
# In another terminal:  target/release/rampart --config dev/manager.toml send --host dev-host --type ping
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked

DEV=$PWD/dev
PORT=${RAMPART_DEV_PORT:-5671}
NODE=rampart-dev@localhost
HOST=dev-host
export RABBITMQ_NODENAME=$NODE ERL_EPMD_PORT=${RAMPART_DEV_EPMD_PORT:-4370}
export RABBITMQ_CONFIG_FILE=$DEV/broker/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$DEV/broker/enabled_plugins
export RABBITMQ_MNESIA_BASE=$DEV/broker/mnesia RABBITMQ_LOG_BASE=$DEV/broker/log
export RABBITMQ_DIST_PORT=${RAMPART_DEV_DIST_PORT:-25680} RABBITMQ_PID_FILE=$DEV/broker/pid
mkdir -p "$DEV/pki" "$DEV/broker"
chmod 755 "$DEV"

pki() {  # name, SAN list, extended key usage
    local n=$1
    [ -f "$DEV/pki/$n.pem" ] && return
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$DEV/pki/$n.key" \
        -out "$DEV/pki/$n.csr" -subj "/CN=$n" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
        "$3" "$2" > "$DEV/pki/$n.ext"
    openssl x509 -req -in "$DEV/pki/$n.csr" -CA "$DEV/pki/ca.pem" -CAkey "$DEV/pki/ca.key" \
        -CAcreateserial -days 365 -extfile "$DEV/pki/$n.ext" -out "$DEV/pki/$n.pem" 2>/dev/null
}
if [ ! -f "$DEV/pki/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -keyout "$DEV/pki/ca.key" -out "$DEV/pki/ca.pem" -subj "/CN=rampart-dev-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
pki localhost "DNS:localhost,IP:127.0.0.1" serverAuth
pki "$HOST" "DNS:$HOST" clientAuth
pki manager "DNS:manager" clientAuth
chmod 644 "$DEV"/pki/*.pem "$DEV/pki/localhost.key"

cat > "$DEV/broker/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$PORT
ssl_options.cacertfile = $DEV/pki/ca.pem
ssl_options.certfile = $DEV/pki/localhost.pem
ssl_options.keyfile = $DEV/pki/localhost.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
auth_mechanisms.1 = EXTERNAL
ssl_cert_login_from = common_name
loopback_users = none
CONF
echo '[rabbitmq_auth_mechanism_ssl].' > "$DEV/broker/enabled_plugins"
chown -R rabbitmq:rabbitmq "$DEV/broker"

ctl() { rabbitmqctl -q -n "$NODE" "$@"; }
if ! ctl status >/dev/null 2>&1; then
    echo "starting RabbitMQ node $NODE on 127.0.0.1:$PORT (TLS only)" >&2
    setsid rabbitmq-server > "$DEV/broker/server.out" 2>&1 < /dev/null &
    # await_startup fails at once until the node has registered with epmd: poll.
    for _ in $(seq 90); do
        ctl await_startup --timeout 5 >/dev/null 2>&1 && break
        sleep 1
    done
    ctl await_startup --timeout 5 >/dev/null
fi
for u in manager "$HOST"; do
    ctl add_user "$u" "$(head -c 24 /dev/urandom | base64)" 2>/dev/null || true
done
ctl delete_user guest 2>/dev/null || true
M='^(rampart\..*|amq\.gen-.*)$'
ctl set_permissions -p / manager "$M" "$M" "$M"
H=${HOST//./\\.}
ctl set_permissions -p / "$HOST" "^rampart\\.host\\.$H\$" \
    "^(rampart\\.host\\.$H|rampart\\.acks|rampart\\.events|rampart\\.dead)\$" \
    "^(rampart\\.host\\.$H|rampart\\.commands)\$"
ctl set_topic_permissions -p / "$HOST" rampart.commands '^$' "^$H\$"
ctl set_topic_permissions -p / "$HOST" rampart.acks "^$H\$" '^$'
ctl set_topic_permissions -p / "$HOST" rampart.events "^[a-z_]+\\.$H\$" '^$'

for who in "$HOST" manager; do
    cat > "$DEV/$( [ "$who" = manager ] && echo manager || echo agent ).toml" <<CONF
state_dir = "$DEV/state-$who"
[broker]
urls = ["amqps://localhost:$PORT/%2f"]
ca_file = "$DEV/pki/ca.pem"
cert_file = "$DEV/pki/$who.pem"
key_file = "$DEV/pki/$who.key"
[control]
socket = "$DEV/rampart-$who.sock"
CONF
done
# The manager declares the shared topology (exchanges, dead-letter queue) and the host queue.
target/release/rampart --config "$DEV/manager.toml" send --host "$HOST" --type ping --timeout 1 >/dev/null 2>&1 || true
echo "agent config: $DEV/agent.toml; try: target/release/rampart --config dev/manager.toml send --host $HOST --type state.sync" >&2
exec target/release/rampart --config "$DEV/agent.toml" run
