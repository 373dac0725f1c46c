#!/usr/bin/env bash
# Package tests: the .deb builds, holds the expected files with the right modes, installs
# (enabled, not started), keeps a changed configuration on upgrade, and removes and purges
# cleanly. Needs root and dpkg; leaves the machine as it found it.
set -uo pipefail
cd "$(dirname "$0")/.."
pass=0
fail=0
check() {  # description, command...
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        echo "FAILED: $what" >&2
    fi
}
if dpkg -s rampart >/dev/null 2>&1; then
    echo "package tests: rampart is already installed here; not touching it" >&2
    exit 1
fi
deb=$(scripts/build-deb.sh) || { echo "FAILED: build" >&2; exit 1; }
listing=$(dpkg-deb -c "$deb")
has() { grep -Eq "^$1 +0/0 +[0-9]+ .* \./$2\$" <<<"$listing"; }
check "binary 0755" has -rwxr-xr-x usr/bin/rampart
check "config 0640" has -rw-r----- etc/rampart/rampart.toml
check "unit" has -rw-r--r-- usr/lib/systemd/system/rampart.service
check "man page" has -rw-r--r-- usr/share/man/man1/rampart.1.gz
check "bash completion" has -rw-r--r-- usr/share/bash-completion/completions/rampart
check "zsh completion" has -rw-r--r-- usr/share/zsh/vendor-completions/_rampart
check "operations doc" has -rw-r--r-- usr/share/doc/rampart/operations.md
check "config is a conffile" bash -c "dpkg-deb -I '$deb' conffiles | grep -qx /etc/rampart/rampart.toml"

export DEBIAN_FRONTEND=noninteractive
check "installs" dpkg -i "$deb"
check "runs" /usr/bin/rampart --version
check "state dir 0700" test "$(stat -c %a /var/lib/rampart)" = 700
check "config mode 0640" test "$(stat -c %a /etc/rampart/rampart.toml)" = 640
check "enabled" test -L /etc/systemd/system/multi-user.target.wants/rampart.service
check "not started" bash -c "! pgrep -f '^/usr/bin/rampart'"
check "unit verifies" systemd-analyze verify --man=no /usr/lib/systemd/system/rampart.service
echo "# changed by the operator" >> /etc/rampart/rampart.toml
check "upgrade" dpkg -i --force-confold "$deb"
check "config kept on upgrade" grep -q "changed by the operator" /etc/rampart/rampart.toml
check "removes" dpkg -r rampart
check "binary gone" test ! -e /usr/bin/rampart
check "config kept after remove" test -e /etc/rampart/rampart.toml
check "purges" dpkg -P rampart
check "config gone after purge" test ! -e /etc/rampart/rampart.toml
check "state gone after purge" test ! -e /var/lib/rampart
check "not enabled after purge" test ! -e /etc/systemd/system/multi-user.target.wants/rampart.service
echo "package tests: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
