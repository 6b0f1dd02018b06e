# shellcheck shell=bash
# Shared shell helpers for the project's scripts. Sourced, never run.

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# apt_install PKG...: installs Debian packages; pinned to the host's own release when newer
# suites are listed too, so the host is never upgraded by accident.
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages ($*); run this once as root or install them"
    step "installing Debian packages: $*"
    if [ -z "${DEVMODEL_APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        export DEVMODEL_APT_UPDATED=1
    fi
    local pin=()
    if grep -rqsE '\b(trixie|sid|forky|testing|unstable)\b' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        pin=(-t "$(. /etc/os-release && echo "$VERSION_CODENAME")")
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${pin[@]}" "$@" >/dev/null
}
