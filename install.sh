#!/usr/bin/env bash
# at-gateway: build the one-file .pyz, install it, run it under systemd, deploy it over SSH.
# Run `./install.sh help` for the commands. Every command is idempotent and says what it does.
set -euo pipefail

NAME=at-gateway
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Layout. AT_GATEWAY_ROOT prefixes every installed path (tests, image builds); `deploy` forwards
# these variables to the server, so they describe the server's layout there.
ROOT=${AT_GATEWAY_ROOT:-}
PREFIX=${AT_GATEWAY_PREFIX:-/usr/local}
SERVICE_USER=${AT_GATEWAY_USER:-$NAME}
BIN=$ROOT$PREFIX/bin/$NAME
ETC=$ROOT/etc/$NAME
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/$NAME.service
DROPIN_DIR=$UNIT_DIR/$NAME.service.d
CONFIG_DROPIN=$DROPIN_DIR/10-from-config.conf
STATE=$ROOT/var/lib/$NAME
# Seconds the new version gets to answer /health (deploy, install-service); rollback gets at least 30.
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-30}
SAY_PREFIX=${SAY_PREFIX:-}

say() { printf '%s==> %s\n' "$SAY_PREFIX" "$*" >&2; }
run() { say "$*"; "$@"; }
die() { printf '%sinstall.sh: error: %s\n' "$SAY_PREFIX" "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

usage() {
    cat <<EOF
Usage: ./install.sh COMMAND [ARGS]

  build                 build dist/at-gateway.pyz (python3 build_zipapp.py)
  install               install the .pyz as $PREFIX/bin/$NAME (mode 755, root-owned)
  install-service       install, then: system user '$NAME' (no login, no home), /etc/$NAME/config.yaml
                        (mode 600; never overwritten) and optional .env, the systemd unit; enable and start it
  uninstall [--purge]   stop and remove the service and the binary; --purge also removes /etc/$NAME,
                        /var/lib/$NAME and the user
  deploy                build, upload to SSH_HOST, check the config with the new binary, swap it in
                        atomically, restart (or install the service the first time), wait for /health,
                        roll back to the previous binary if it does not become healthy
  status                service status, health and version
  logs [ARGS]           journalctl -u $NAME (default: -n 100 -f)
  test                  run the test suite (make test)
  test-coverage         run the test suite under coverage and print the report
  help                  this text

deploy settings (environment, or SSH_* lines in ./.env, which are never sent to the server):
  SSH_HOST (required), SSH_USER (root), SSH_PORT (22), SSH_KEY, SSH_OPTS (extra ssh options)
  DEPLOY_CONFIG  config pushed as /etc/$NAME/config.yaml (default ./config.yaml if present; empty: none);
                 install-service starts from it too (else ./config.yaml, else config.yaml.example)
  DEPLOY_ENV     env file pushed as /etc/$NAME/.env, without SSH_* lines (default ./.env if present)
  PYZ            deploy/install this .pyz instead of building one
  HEALTH_TIMEOUT seconds the new version gets to become healthy ($HEALTH_TIMEOUT)
Layout (forwarded by deploy): AT_GATEWAY_ROOT (''), AT_GATEWAY_PREFIX (/usr/local), AT_GATEWAY_USER ($NAME).
A non-root SSH_USER needs passwordless sudo on the server (unless AT_GATEWAY_ROOT is set).
EOF
}

# Small helpers in Python (always there: the .pyz needs it). Run as: py_helper COMMAND ARGS...
read -r -d '' PY_HELPER <<'PY' || true
import os, ssl, sys, urllib.request

def parse_env(path):
    """A systemd EnvironmentFile: KEY=VALUE lines, # or ; comments, optional quotes."""
    env = {}
    if not path or not os.path.exists(path):
        return env
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key = key.strip()
            if key.startswith("export "):
                key = key[7:].strip()
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            env[key] = value
    return env

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "envrun":  # envrun ENVFILE CMD...: run CMD with the env file's variables added
    env = dict(os.environ)
    env.update(parse_env(args[0]))
    os.execvpe(args[1], args[1:], env)
elif cmd == "settings":  # settings PYZ CONFIG ENVFILE: "<health URL> <port> <drain seconds>" of that config
    sys.path.insert(0, args[0])
    from at_gateway.config import load_config
    env = dict(os.environ)
    env.update(parse_env(args[2]))
    cfg = load_config(args[1], env)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.host, cfg.host)
    host = f"[{host}]" if ":" in host else host
    drain = int(-(-cfg.shutdown_timeout // 1))
    print(f"{'https' if cfg.tls else 'http'}://{host}:{cfg.port}/health {cfg.port} {drain}")
elif cmd == "probe":  # probe URL: exit 0 when /health says healthy
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # our own gateway on loopback, often with a self-signed certificate
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(args[0], timeout=2) as r:
            sys.exit(0 if r.status == 200 and b"healthy" in r.read() else 1)
    except Exception:
        sys.exit(1)
PY

py_helper() { python3 -I -S -c "$PY_HELPER" "$@"; }

check_python() {
    have python3 || die "python3 not found: the .pyz needs CPython >= 3.10 (apt install python3)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "python3 is $(python3 -V 2>&1); the .pyz needs CPython >= 3.10"
}

need_root() {
    if [ -z "$ROOT" ] && ! is_root; then
        die "this needs root: sudo $0 $*"
    fi
}

build_python() {
    if [ -x "$HERE/.venv/bin/python" ]; then echo "$HERE/.venv/bin/python"; else echo "${PYTHON:-python3}"; fi
}

cmd_build() {
    [ -f "$HERE/build_zipapp.py" ] || die "build_zipapp.py not found next to install.sh"
    run "$(build_python)" "$HERE/build_zipapp.py" -o "$HERE/dist/$NAME.pyz"
}

# The .pyz to install: $PYZ, else dist/at-gateway.pyz (built if missing).
pyz_file() {
    if [ -n "${PYZ:-}" ]; then
        [ -f "$PYZ" ] || die "PYZ=$PYZ: no such file"
        echo "$PYZ"
        return
    fi
    [ -f "$HERE/dist/$NAME.pyz" ] || cmd_build >&2
    echo "$HERE/dist/$NAME.pyz"
}

# install_file SRC DEST MODE [OWNER:GROUP]: copy beside DEST, then rename over it (never half-written).
install_file() {
    local src=$1 dest=$2 mode=$3 owner=${4:-}
    local tmp
    tmp="$(dirname "$dest")/.$(basename "$dest").tmp.$$"
    # Each step checked by hand: callers such as install_unit run with `set -e` turned off.
    install -m "$mode" "$src" "$tmp" || return 1
    if [ -n "$owner" ] && is_root; then chown "$owner" "$tmp" || { rm -f "$tmp"; return 1; }; fi
    mv -f "$tmp" "$dest" || { rm -f "$tmp"; return 1; }
}

cmd_install() {
    need_root install
    check_python
    local src
    src=$(pyz_file)
    run install -d -m 0755 "$(dirname "$BIN")"
    if [ -f "$BIN" ] && cmp -s "$src" "$BIN"; then
        say "$BIN is already this build"
    else
        say "installing $src as $BIN (mode 755)"
        install_file "$src" "$BIN" 0755 root:root
    fi
    say "installed: $("$BIN" version)"
}

ensure_user() {
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "user $SERVICE_USER exists"
        return
    fi
    [ -z "$ROOT" ] || die "user $SERVICE_USER does not exist (with AT_GATEWAY_ROOT set, set AT_GATEWAY_USER to an existing user)"
    local shell=/usr/sbin/nologin
    [ -x "$shell" ] || shell=/sbin/nologin
    [ -x "$shell" ] || shell=/bin/false
    run useradd --system --user-group --no-create-home --home-dir /nonexistent --shell "$shell" "$SERVICE_USER"
}

service_group() { id -gn "$SERVICE_USER"; }

ensure_etc() {
    local group
    group=$(service_group)
    if [ ! -d "$ETC" ]; then
        run install -d -m 0750 "$ETC"
    fi
    if is_root; then chown "root:$group" "$ETC" && chmod 0750 "$ETC"; fi
}

# The unit as shipped, with the layout substituted when it is not the default one.
render_unit() {
    sed -e "s#/usr/local/bin/$NAME#$BIN#g" -e "s#/etc/$NAME#$ETC#g" \
        -e "s#^User=.*#User=$SERVICE_USER#" -e "s#^Group=.*#Group=$(service_group)#" \
        "$HERE/deploy/$NAME.service"
}

# install_unit: returns 0 when the installed unit changed, 1 when not, 2 when it could not be written.
# (Callers test its status, which turns `set -e` off inside it: every step is checked by hand.)
install_unit() {
    local tmp rc=0
    tmp=$(mktemp) || return 2
    render_unit >"$tmp" || rc=2
    if [ "$rc" -eq 0 ] && [ -f "$UNIT" ] && cmp -s "$tmp" "$UNIT"; then
        rm -f "$tmp"
        say "$UNIT is up to date"
        return 1
    fi
    if [ "$rc" -eq 0 ]; then
        say "installing $UNIT"
        { install -d -m 0755 "$UNIT_DIR" && install_file "$tmp" "$UNIT" 0644 root:root; } || rc=2
    fi
    rm -f "$tmp"
    return "$rc"
}

# What the unit must add for this config: a port below 1024 needs CAP_NET_BIND_SERVICE, which the unit
# does not grant; a drain longer than 30s needs a longer stop timeout than the unit's 45s.
# config_dropin_text PORT DRAIN_SECONDS: the drop-in's text, empty when none is needed.
config_dropin_text() {
    local port=$1 drain=$2 text=""
    if [ "$port" -gt 0 ] && [ "$port" -lt 1024 ]; then
        text="# The port ($port) is below 1024: allow binding it, and nothing else.
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
# Capabilities inside a private user namespace do not count for the host's network.
PrivateUsers=no
"
    fi
    if [ "$drain" -gt 30 ]; then
        text="$text# shutdown_timeout is ${drain}s: let the drain finish before systemd kills the process.
TimeoutStopSec=$((drain + 15))s
"
    fi
    if [ -n "$text" ]; then
        printf '# Written by install.sh from config.yaml (deploy and install-service rewrite it).\n[Service]\n%s' "$text"
    fi
}

# update_config_dropin: returns 0 when the drop-in changed, 1 when not, 2 when the config cannot be read or the
# drop-in cannot be written (checked by hand, as in install_unit).
update_config_dropin() {
    local settings url port drain text tmp
    settings=$(py_helper settings "$BIN" "$ETC/config.yaml" "$ETC/.env") || return 2
    read -r url port drain <<<"$settings"
    text=$(config_dropin_text "$port" "$drain")
    if [ -z "$text" ]; then
        if [ ! -f "$CONFIG_DROPIN" ]; then return 1; fi
        run rm -f "$CONFIG_DROPIN" || return 2
        rmdir "$DROPIN_DIR" 2>/dev/null || true
        return 0
    fi
    if [ -f "$CONFIG_DROPIN" ] && [ "$(cat "$CONFIG_DROPIN")" = "$text" ]; then return 1; fi
    say "writing $CONFIG_DROPIN (port $port, drain ${drain}s)"
    tmp=$(mktemp) || return 2
    local rc=0
    { install -d -m 0755 "$DROPIN_DIR" && printf '%s\n' "$text" >"$tmp" &&
        install_file "$tmp" "$CONFIG_DROPIN" 0644 root:root; } || rc=2
    rm -f "$tmp"
    return "$rc"
}

# install_secret SRC DEST: mode 600, owned by the service user.
install_secret() {
    local owner
    owner="$SERVICE_USER:$(service_group)"
    say "installing $2 (mode 600, owner $owner)"
    install_file "$1" "$2" 0600 "$owner"
}

# Drop the deploy-only SSH_* lines: they must never reach the server.
# (grep's status 1, "no line left", is fine; 2, the file cannot be read, is not.)
filter_env() {
    local rc=0
    grep -Ev '^[[:space:]]*(export[[:space:]]+)?SSH_[A-Za-z0-9_]*[[:space:]]*=' "$1" || rc=$?
    [ "$rc" -le 1 ]
}

# health_url PYZ CONFIG ENVFILE
health_url() { local u; u=$(py_helper settings "$1" "$2" "$3") && echo "${u%% *}"; }

# wait_healthy URL SECONDS: poll /health until it answers or the deadline passes (or systemd gave up).
wait_healthy() {
    local url=$1 deadline=$((SECONDS + $2))
    say "waiting up to $2s for $url"
    while [ "$SECONDS" -lt "$deadline" ]; do
        if py_helper probe "$url"; then
            say "healthy: $url"
            return 0
        fi
        if systemctl is-failed --quiet "$NAME" 2>/dev/null; then
            say "systemd reports $NAME as failed"
            return 1
        fi
        sleep 0.3
    done
    say "no healthy answer from $url within $2s"
    return 1
}

# The config install-service starts from: $DEPLOY_CONFIG, else ./config.yaml, else the example.
config_source() {
    if [ -n "${DEPLOY_CONFIG:-}" ]; then
        echo "$DEPLOY_CONFIG"
    elif [ -f "$HERE/config.yaml" ]; then
        echo "$HERE/config.yaml"
    else
        echo "$HERE/config.yaml.example"
    fi
}

cmd_install_service() {
    need_root install-service
    cmd_install
    ensure_user
    ensure_etc
    if [ -f "$ETC/config.yaml" ]; then
        say "$ETC/config.yaml exists: kept as it is"
    else
        install_secret "$(config_source)" "$ETC/config.yaml"
    fi
    local envsrc=${DEPLOY_ENV-$HERE/.env}
    if [ -f "$ETC/.env" ]; then
        say "$ETC/.env exists: kept as it is"
    elif [ -n "$envsrc" ] && [ -f "$envsrc" ]; then
        local tmp
        tmp=$(mktemp)
        filter_env "$envsrc" >"$tmp"
        install_secret "$tmp" "$ETC/.env"
        rm -f "$tmp"
    fi
    py_helper envrun "$ETC/.env" "$BIN" check-config --config "$ETC/config.yaml" ||
        die "$ETC/config.yaml is not valid (see above); fix it and run install-service again"
    local rc=0
    install_unit || rc=$?
    [ "$rc" -ne 2 ] || die "cannot write $UNIT"
    rc=0
    update_config_dropin || rc=$?
    [ "$rc" -ne 2 ] || die "cannot read $ETC/config.yaml with the installed binary, or write $CONFIG_DROPIN"
    run systemctl daemon-reload
    run systemctl enable "$NAME"
    if systemctl is-active --quiet "$NAME"; then
        run systemctl restart "$NAME"
    else
        run systemctl start "$NAME"
    fi
    wait_healthy "$(health_url "$BIN" "$ETC/config.yaml" "$ETC/.env")" "$HEALTH_TIMEOUT" ||
        die "$NAME did not become healthy; see: ./install.sh logs"
    say "done: $NAME is running ($("$BIN" version))"
}

cmd_uninstall() {
    local purge=no
    case "${1:-}" in
        --purge) purge=yes ;;
        "") ;;
        *) die "uninstall: unknown argument $1 (only --purge)" ;;
    esac
    need_root uninstall
    if [ -f "$UNIT" ] || systemctl cat "$NAME" >/dev/null 2>&1; then
        run systemctl disable --now "$NAME" || true
    fi
    local f
    for f in "$UNIT" "$CONFIG_DROPIN"; do
        if [ -e "$f" ]; then run rm -f "$f"; fi
    done
    if [ -d "$DROPIN_DIR" ]; then
        if [ "$purge" = yes ]; then run rm -rf "$DROPIN_DIR"; else rmdir "$DROPIN_DIR" 2>/dev/null || true; fi
    fi
    if have systemctl; then run systemctl daemon-reload || true; fi
    for f in "$BIN" "$BIN.prev" "$BIN.new"; do
        if [ -e "$f" ]; then run rm -f "$f"; fi
    done
    if [ "$purge" = yes ]; then
        for f in "$ETC" "$STATE"; do
            if [ -e "$f" ]; then run rm -rf "$f"; fi
        done
        if [ -z "$ROOT" ] && [ "$SERVICE_USER" != "$(id -un)" ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
            run userdel "$SERVICE_USER"
        fi
    else
        say "kept $ETC, $STATE and the user $SERVICE_USER (uninstall --purge removes them)"
    fi
    say "uninstalled"
}

cmd_status() {
    local rc=0 url
    systemctl status "$NAME" --no-pager || rc=$?
    if [ -x "$BIN" ]; then
        say "binary: $("$BIN" version)"
        if url=$(health_url "$BIN" "$ETC/config.yaml" "$ETC/.env" 2>/dev/null) && py_helper probe "$url"; then
            say "health: $url healthy"
        else
            say "health: no healthy answer${url:+ from $url}"
            rc=1
        fi
    else
        say "binary: $BIN not installed"
        rc=1
    fi
    return "$rc"
}

cmd_logs() {
    if [ $# -eq 0 ]; then set -- -n 100 -f; fi
    run journalctl -u "$NAME" "$@"
}

cmd_test() { run make -C "$HERE" test; }

cmd_test_coverage() {
    run make -C "$HERE" .venv/.installed
    local py=$HERE/.venv/bin/python
    "$py" -c 'import coverage' 2>/dev/null || run "$py" -m pip install -q coverage
    mkdir -p "$HERE/build"
    export COVERAGE_FILE=$HERE/build/.coverage  # inside the git-ignored build/
    (cd "$HERE" && run "$py" -m coverage run --source=at_gateway -m pytest -q &&
        run "$py" -m coverage report --show-missing --skip-covered)
}

# --- deploy: the laptop side -------------------------------------------------------------------

# POSIX-shell single quoting, for the command line the server's shell reads.
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# SSH_* settings from ./.env when not in the environment (read, never executed).
load_ssh_settings() {
    local envfile=$HERE/.env line key value
    [ -f "$envfile" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        if [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?(SSH_(HOST|USER|PORT|KEY|OPTS))=(.*)$ ]]; then
            key=${BASH_REMATCH[2]}
            value=${BASH_REMATCH[4]}
            value=${value%\"}; value=${value#\"}; value=${value%\'}; value=${value#\'}
            if [ -z "${!key:-}" ]; then printf -v "$key" '%s' "$value"; fi
        fi
    done <"$envfile"
}

cmd_deploy() {
    load_ssh_settings
    [ -n "${SSH_HOST:-}" ] || die "deploy: SSH_HOST is required (SSH_HOST=server ./install.sh deploy)"
    local user=${SSH_USER:-root} port=${SSH_PORT:-22}
    local src stage
    if [ -n "${PYZ:-}" ]; then src=$(pyz_file); else cmd_build; src=$HERE/dist/$NAME.pyz; fi
    stage=$(mktemp -d)
    DEPLOY_STAGE=$stage
    trap 'rm -rf "$DEPLOY_STAGE"' EXIT
    mkdir -p "$stage/deploy" "$stage/dist"
    cp "$HERE/install.sh" "$stage/install.sh"
    cp "$HERE/deploy/$NAME.service" "$stage/deploy/"
    cp "$HERE/config.yaml.example" "$stage/config.yaml.example"
    cp "$src" "$stage/dist/$NAME.pyz"
    local config=${DEPLOY_CONFIG-} envfile=${DEPLOY_ENV-}
    if [ -z "${DEPLOY_CONFIG+set}" ] && [ -f "$HERE/config.yaml" ]; then config=$HERE/config.yaml; fi
    if [ -z "${DEPLOY_ENV+set}" ] && [ -f "$HERE/.env" ]; then envfile=$HERE/.env; fi
    (
        umask 077
        if [ -n "$config" ]; then
            [ -f "$config" ] || die "DEPLOY_CONFIG=$config: no such file"
            say "pushing config $config"
            cp "$config" "$stage/push-config.yaml"
        fi
        if [ -n "$envfile" ]; then
            [ -f "$envfile" ] || die "DEPLOY_ENV=$envfile: no such file"
            say "pushing env file $envfile (without SSH_* lines)"
            filter_env "$envfile" >"$stage/push.env"
        fi
    )
    chmod -R go-rwx "$stage"

    local -a ssh_cmd=(ssh -o BatchMode=yes -o ConnectTimeout=15 -p "$port")
    if [ -n "${SSH_KEY:-}" ]; then ssh_cmd+=(-i "$SSH_KEY" -o IdentitiesOnly=yes); fi
    local -a extra=()
    if [ -n "${SSH_OPTS:-}" ]; then read -r -a extra <<<"$SSH_OPTS"; fi
    ssh_cmd+=(${extra[@]+"${extra[@]}"} "$user@$SSH_HOST")

    local vars="" v
    for v in AT_GATEWAY_ROOT AT_GATEWAY_PREFIX AT_GATEWAY_USER HEALTH_TIMEOUT; do
        if [ -n "${!v:-}" ]; then vars="$vars $v=$(shq "${!v}")"; fi
    done
    # On the server: unpack into a private temporary directory and run our own copy of this script.
    local remote
    remote="umask 077 && d=\$(mktemp -d) && trap 'rm -rf \"\$d\"' EXIT && tar -xof - -C \"\$d\" && \
S= && if [ \"\$(id -u)\" != 0 ] && [ -z $(shq "${AT_GATEWAY_ROOT:-}") ]; then S='sudo -n'; fi && \
\$S env SAY_PREFIX='[remote] '$vars bash \"\$d/install.sh\" _remote-deploy \"\$d\""
    say "deploying $(basename "$src") to $user@$SSH_HOST:$port"
    local rc=0
    (cd "$stage" && COPYFILE_DISABLE=1 tar -cf - .) | "${ssh_cmd[@]}" "$remote" || rc=$?
    if [ "$rc" -eq 255 ]; then die "deploy: ssh to $user@$SSH_HOST:$port failed"; fi
    [ "$rc" -eq 0 ] || die "deploy failed (exit $rc): see the [remote] lines above"
    say "deploy finished"
}

# --- deploy: the server side (run by cmd_deploy through ssh, from the uploaded copy) -----------------

cmd_remote_deploy() {
    local stage=$1
    need_root _remote-deploy
    check_python
    (umask 022 && mkdir -p "$(dirname "$BIN")" "$(dirname "$ETC")")
    mkdir -p "$ETC"
    if have flock; then
        exec 9>"$ETC/.deploy.lock"
        flock -w 120 9 || die "another deploy is still running (lock $ETC/.deploy.lock)"
    fi
    local new=$BIN.new
    say "uploading the new binary beside the live one: $new"
    install_file "$stage/dist/$NAME.pyz" "$new" 0755 root:root
    say "new binary: $("$new" version)"

    # What the new version will run with: pushed files, else the installed ones, else the example.
    local config=$ETC/config.yaml envfile=$ETC/.env
    if [ -f "$stage/push-config.yaml" ]; then config=$stage/push-config.yaml; fi
    if [ ! -f "$config" ]; then config=$stage/config.yaml.example; fi
    if [ -f "$stage/push.env" ]; then envfile=$stage/push.env; fi
    say "checking the config with the NEW binary before touching anything"
    if ! py_helper envrun "$envfile" "$new" check-config --config "$config"; then
        rm -f "$new"
        die "check-config failed with the new binary: nothing was changed, the running service is untouched"
    fi

    FIRST=no
    if [ ! -f "$UNIT" ] || [ ! -f "$BIN" ]; then FIRST=yes; fi
    if [ -f "$BIN" ]; then ln -f "$BIN" "$BIN.prev"; else rm -f "$BIN.prev"; fi
    if [ "$FIRST" = yes ]; then
        say "first deploy on this server: installing the service"
        ensure_user
        ensure_etc
    fi
    # Keep what this deploy replaces, to put it back if the new version fails.
    rm -f "$ETC/config.yaml.prev" "$ETC/.env.prev" "$UNIT.prev"
    NEW_ENV=no
    if [ -f "$stage/push-config.yaml" ]; then
        push_secret "$stage/push-config.yaml" "$ETC/config.yaml"
    elif [ ! -f "$ETC/config.yaml" ]; then
        install_secret "$stage/config.yaml.example" "$ETC/config.yaml"
    fi
    if [ -f "$stage/push.env" ]; then
        if [ ! -f "$ETC/.env" ]; then NEW_ENV=yes; fi
        push_secret "$stage/push.env" "$ETC/.env"
    fi
    if [ -f "$UNIT" ]; then cp -p "$UNIT" "$UNIT.prev"; fi
    say "swapping in the new binary (rename $new -> $BIN)"
    mv -f "$new" "$BIN"

    local url=""
    if activate && url=$(health_url "$BIN" "$ETC/config.yaml" "$ETC/.env") && wait_healthy "$url" "$HEALTH_TIMEOUT"
    then
        # The replaced config and .env are old secrets: not kept once the new version is healthy.
        rm -f "$UNIT.prev" "$ETC/config.yaml.prev" "$ETC/.env.prev"
        say "deployed: $("$BIN" version)"
        return 0
    fi
    rollback "${url:-/health}"
}

# push_secret SRC DEST: install a pushed file, keeping the one it replaces as DEST.prev.
push_secret() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "$2 unchanged"
        return 0
    fi
    if [ -f "$2" ]; then cp -p "$2" "$2.prev"; fi
    install_secret "$1" "$2"
}

# Unit, port drop-in, (first time) enable, restart. Every step checked: a failure means rollback.
activate() {
    local changed=no rc=0
    install_unit || rc=$?
    case "$rc" in 0) changed=yes ;; 2) return 1 ;; esac
    rc=0
    update_config_dropin || rc=$?
    case "$rc" in 0) changed=yes ;; 2) return 1 ;; esac
    if [ "$changed" = yes ]; then run systemctl daemon-reload || return 1; fi
    if [ "$FIRST" = yes ]; then run systemctl enable "$NAME" || return 1; fi
    # A unit that hit StartLimitBurst (say, an earlier failed deploy) refuses even a manual restart until reset.
    run systemctl reset-failed "$NAME" || true
    run systemctl restart "$NAME" || return 1
}

# Put back everything the deploy changed, restart the previous version, and fail saying why.
rollback() {
    local url=$1
    if [ ! -f "$BIN.prev" ]; then
        run systemctl disable --now "$NAME" || true
        die "first deploy failed: the new version did not become healthy at $url; the service is stopped (see: ./install.sh logs)"
    fi
    say "ROLLING BACK: the new version did not become healthy at $url"
    run mv -f "$BIN.prev" "$BIN"
    if [ -f "$ETC/config.yaml.prev" ]; then run mv -f "$ETC/config.yaml.prev" "$ETC/config.yaml"; fi
    if [ -f "$ETC/.env.prev" ]; then
        run mv -f "$ETC/.env.prev" "$ETC/.env"
    elif [ "$NEW_ENV" = yes ]; then
        run rm -f "$ETC/.env"
    fi
    if [ -f "$UNIT.prev" ]; then run mv -f "$UNIT.prev" "$UNIT"; fi
    local back t=$HEALTH_TIMEOUT
    update_config_dropin || true
    run systemctl daemon-reload || true
    # The new version crash-looping under Restart=on-failure may have hit StartLimitBurst: systemd then
    # refuses to start the unit at all, the previous version included, until the counter is reset.
    run systemctl reset-failed "$NAME" || true
    run systemctl restart "$NAME" || true
    if [ "$t" -lt 30 ]; then t=30; fi
    if back=$(health_url "$BIN" "$ETC/config.yaml" "$ETC/.env") && wait_healthy "$back" "$t"; then
        die "deploy failed: the new version did not become healthy at $url; rolled back, the previous version ($("$BIN" version)) is serving again"
    fi
    die "deploy failed, and the previous version is not healthy either: check ./install.sh status and logs on the server"
}

main() {
    local cmd=${1:-help}
    if [ $# -gt 0 ]; then shift; fi
    case "$cmd" in
        build) cmd_build ;;
        install) cmd_install ;;
        install-service) cmd_install_service ;;
        uninstall) cmd_uninstall "$@" ;;
        deploy) cmd_deploy ;;
        status) cmd_status ;;
        logs) cmd_logs "$@" ;;
        test) cmd_test ;;
        test-coverage) cmd_test_coverage ;;
        help | -h | --help) usage ;;
        _remote-deploy) cmd_remote_deploy "$@" ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

# Sourcing the script (tests) defines the functions without running a command.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
