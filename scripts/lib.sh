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

# module_file DIR NAME: the module NAME's file under DIR (names treat - and _ alike).
module_file() {
    local pattern=${2//[-_]/[-_]}
    find "$1" -regextype posix-extended -regex ".*/$pattern\.ko(\.xz|\.zst)?" | head -n1
}

# add_module TREE OUT NAME: uncompresses the module NAME of an unpacked kernel package's TREE
# and, first, its dependencies into OUT and appends each to OUT/order once (depmod has not run
# on an unpacked package, so .modinfo is read); a built-in one adds nothing. For the initramfs
# images of the test beds that boot Debian's generic kernel (Xen's dom0, the udmabuf VM).
add_module() {
    local file name ko dep
    name=$(echo "$3" | tr - _)
    grep -qx "$name" "$2/order" 2>/dev/null && return 0
    file=$(module_file "$1" "$3")
    if [ -z "$file" ]; then
        # Built into the kernel: nothing to load.
        grep -qE "/${3//[-_]/[-_]}\.ko$" "$1/modules.builtin" ||
            die "kernel module $3 is neither in the package nor built in"
        return 0
    fi
    ko=$2/$name.ko
    case $file in
        *.xz) xz -dc "$file" >"$ko" ;;
        *.zst) zstd -qdc "$file" >"$ko" ;;
        *) cp "$file" "$ko" ;;
    esac
    for dep in $(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr , ' '); do
        add_module "$1" "$2" "$dep"
    done
    echo "$name" >>"$2/order"
}
