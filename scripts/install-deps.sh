#!/usr/bin/env bash
# Installs the Debian packages rampart and its tests need (idempotent; Debian 12).
set -euo pipefail
pkgs=(rabbitmq-server nftables iproute2 openssl procps iputils-ping systemd gzip dnsmasq-base rpm cpio)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
fi
