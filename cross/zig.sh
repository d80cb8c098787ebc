# Sourced by build.sh and test-qemu.sh: link against an old glibc with
# cargo-zigbuild, so that one build runs on every supported OS image.
#
# Rust's std needs glibc 2.17; what raises the requirement is the glibc the
# linker sees (Debian 12's 2.36 gives symbol versions up to 2.34). zig
# ships the headers and symbol-versioned stub libraries of every glibc and
# links against the one named in the target (`aarch64-unknown-linux-gnu.2.31`);
# it is also the C compiler for ring. Both come from PyPI into .venv
# (`ziglang`, `cargo-zigbuild`; scripts/setup.sh installs them), so nothing
# else is needed on a fresh machine, and the same linker serves x86-64 and
# arm64. (Static musl would also run everywhere, but needs a musl C
# cross-compiler for ring on arm64 and brings musl's slower allocator and
# thread creation.) The output stays in target/TARGET/PROFILE.
#
# Sets: ZIG_TARGET (the target with the glibc suffix) and `zig_cargo`, the
# cargo-zigbuild command for a cargo subcommand (build, test).

# The oldest glibc among the supported OS images: Debian 11, Raspberry Pi OS
# bullseye and Ubuntu 20.04 / JetPack 5 have 2.31.
CRYSTALD_GLIBC=${CRYSTALD_GLIBC:-2.31}
if [ ! -x .venv/bin/cargo-zigbuild ] || ! .venv/bin/python -c 'import ziglang' 2>/dev/null; then
    echo "${0##*/}: .venv lacks cargo-zigbuild or ziglang: run scripts/setup.sh" >&2
    exit 2
fi
# cargo-zigbuild runs `python3 -m ziglang` when no zig is on PATH.
PATH="$PWD/.venv/bin:$PATH"
ZIG_TARGET="$target.$CRYSTALD_GLIBC"
zig_cargo() {
    local sub=$1
    shift
    case "$sub" in
        build) cargo-zigbuild zigbuild --target "$ZIG_TARGET" "$@" ;;
        *) cargo-zigbuild "$sub" --target "$ZIG_TARGET" "$@" ;;
    esac
}
