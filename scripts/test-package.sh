#!/usr/bin/env bash
# Package tests: the .deb builds, holds the expected files with the right modes, installs
# (enabled, not started), keeps a changed configuration on upgrade, and removes and purges
# cleanly; the RPM builds with rpmbuild and holds the same files, modes, scriptlets and unit.
# Needs root, dpkg and rpm; leaves the machine as it found it.
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

# The RPM, built for real by rpmbuild (Debian's rpm package) from a tarball of the tree, with
# the release binary the .deb holds; its files, modes, scriptlets and unit checked likewise.
ver=$(sed -n 's/^Version: *//p' packaging/rampart.spec)
rpmtop=$(mktemp -d)
trap 'rm -rf "$rpmtop"' EXIT
git ls-files -z | tar --null -T - --transform "s,^,rampart-$ver/," -czf "$rpmtop/rampart-$ver.tar.gz"
check "rpm builds" rpmbuild -bb --nodeps --define "_topdir $rpmtop" \
    --define "_sourcedir $rpmtop" --define "prebuilt $PWD/target/release" packaging/rampart.spec
rpm=$(find "$rpmtop/RPMS" -name "rampart-$ver-*.rpm" | head -n 1)
if [ -n "$rpm" ]; then
    rlisting=$(rpm -qlvp "$rpm")
    rhas() { grep -Eq "^$1 .* $2\$" <<<"$rlisting"; }
    check "rpm: binary 0755" rhas -rwxr-xr-x /usr/bin/rampart
    check "rpm: config 0640" rhas -rw-r----- /etc/rampart/rampart.toml
    check "rpm: config dir 0750" rhas drwxr-x--- /etc/rampart
    check "rpm: state dir 0700" rhas drwx------ /var/lib/rampart
    check "rpm: unit" rhas -rw-r--r-- /usr/lib/systemd/system/rampart.service
    check "rpm: man page" rhas -rw-r--r-- "/usr/share/man/man1/rampart.1(.gz)?"
    check "rpm: bash completion" rhas -rw-r--r-- /usr/share/bash-completion/completions/rampart
    check "rpm: operations doc" bash -c "rpm -qlp '$rpm' | grep -q '/operations.md\$'"
    check "rpm: config is noreplace" bash -c \
        "rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpm' | grep -qx 'cn /etc/rampart/rampart.toml'"
    scripts=$(rpm -qp --scripts "$rpm")
    check "rpm: post enables" grep -q "systemctl enable rampart.service" <<<"$scripts"
    check "rpm: preun stops on erase" grep -q "disable --now rampart.service" <<<"$scripts"
    check "rpm: no unexpanded macro" bash -c "! grep -q '%systemd' <<<'$scripts'"
    check "rpm: requires nftables" bash -c "rpm -qRp '$rpm' | grep -q '^nftables'"
    mkdir -p "$rpmtop/root"
    (cd "$rpmtop/root" && rpm2cpio "$rpm" | cpio -idm --quiet)
    check "rpm: same unit as the .deb" cmp "$rpmtop/root/usr/lib/systemd/system/rampart.service" \
        /usr/lib/systemd/system/rampart.service
    check "rpm: unit verifies" systemd-analyze verify --man=no \
        "$rpmtop/root/usr/lib/systemd/system/rampart.service"
    # (rpmbuild strips it, so compare what it says rather than its bytes)
    check "rpm: binary is this build" test "$("$rpmtop/root/usr/bin/rampart" --version)" = \
        "$(target/release/rampart --version)"
fi
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
