#!/usr/bin/env bash
# Builds a Debian package of crystald with dpkg-deb, from binaries that are
# already built, and checks what went into it.
#
#   cross/package-deb.sh ARCH [--bin-dir DIR] [--out DIR] [--systemd-dir DIR]
#                        [--max-glibc VERSION]
#
# ARCH: arm64 (binaries from `cross/build.sh --release`) or amd64 (from
# `cross/build.sh --release x86_64-unknown-linux-gnu`; a plain `cargo build
# --release` links against the build machine's glibc and needs
# --max-glibc of that). --bin-dir packages the crystald and crystal-quantize found
# there instead. The package lands in --out (default
# ${CARGO_TARGET_DIR:-target}/deb); its path is printed on the last line.
# --systemd-dir takes the units and configuration from DIR (default
# systemd/ of this repository). The binaries must need glibc VERSION or
# older (--max-glibc, default 2.31: Debian 11, Ubuntu 20.04 / JetPack 5,
# Raspberry Pi OS bullseye), else the script fails naming the symbols.
#
# Contents: /usr/bin/crystald, /usr/bin/crystal-quantize, every
# systemd/*.service and systemd/*.socket in /lib/systemd/system,
# systemd/NAME.sysusers.conf and NAME.tmpfiles.conf as
# /usr/lib/{sysusers,tmpfiles}.d/NAME.conf, every systemd/*.toml in
# /etc/crystald (as conffiles), README.md, copyright and changelog.gz in
# /usr/share/doc/crystald, and maintainer scripts that create the
# `crystald` system user and /var/lib/crystald and stop the units on
# removal.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "package-deb.sh: $*" >&2
    exit 2
}

arch=
bin_dir=
out_dir=${CARGO_TARGET_DIR:-target}/deb
systemd_dir=systemd
max_glibc=2.31
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --out) out_dir=${2:?--out needs a directory}; shift 2 ;;
        --systemd-dir) systemd_dir=${2:?--systemd-dir needs a directory}; shift 2 ;;
        --max-glibc) max_glibc=${2:?--max-glibc needs a version}; shift 2 ;;
        -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$arch" ] || die "one ARCH only"; arch=$1; shift ;;
    esac
done

target_root=${CARGO_TARGET_DIR:-target}
case "$arch" in
    arm64)
        triple=aarch64-unknown-linux-gnu
        candidates=("$target_root/$triple/release")
        strip_tool=aarch64-linux-gnu-strip
        ;;
    amd64)
        triple=x86_64-unknown-linux-gnu
        candidates=("$target_root/$triple/release" "$target_root/release")
        strip_tool="strip"
        ;;
    "") die "usage: package-deb.sh arm64|amd64 [--bin-dir DIR] [--out DIR] [--systemd-dir DIR] [--max-glibc VERSION]" ;;
    *) die "unsupported architecture $arch (arm64, amd64)" ;;
esac
if [ -z "$bin_dir" ]; then
    for c in "${candidates[@]}"; do
        if [ -x "$c/crystald" ] && [ -x "$c/crystal-quantize" ]; then
            bin_dir=$c
            break
        fi
    done
    [ -n "$bin_dir" ] || die "no $arch binaries in ${candidates[*]}: run cross/build.sh --release $triple first"
fi
for b in crystald crystal-quantize; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b missing"
done

# The ELF machine must match ARCH: a mix-up would install and then fail at exec.
want_machine=$([ "$arch" = arm64 ] && echo AArch64 || echo X86-64)
for b in crystald crystal-quantize; do
    machine=$(readelf -h "$bin_dir/$b" | sed -n 's/^ *Machine: *//p')
    case "$machine" in
        *"$want_machine") ;;
        *) die "$bin_dir/$b is for '$machine', not $arch" ;;
    esac
done

version=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "crystald"))') ||
    die "cannot read the crystald version from Cargo.toml"

pkg=crystald
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/$pkg"
for b in crystald crystal-quantize; do
    install -m 0755 "$bin_dir/$b" "$root/usr/bin/$b"
    # Line tables help backtraces on a dev machine, not on a Pi's SD card.
    if command -v "$strip_tool" >/dev/null; then
        "$strip_tool" --strip-debug "$root/usr/bin/$b"
    fi
done

shopt -s nullglob
units=()
# Sockets first: stopped in this order, a socket cannot re-activate its service.
for f in "$systemd_dir"/*.socket "$systemd_dir"/*.service; do
    install -d -m 0755 "$root/lib/systemd/system"
    install -m 0644 "$f" "$root/lib/systemd/system/"
    units+=("$(basename "$f")")
done
confs=()
for f in "$systemd_dir"/*.toml; do
    install -d -m 0755 "$root/etc/crystald"
    install -m 0644 "$f" "$root/etc/crystald/"
    confs+=("/etc/crystald/$(basename "$f")")
done
# systemd-sysusers and systemd-tmpfiles read these: the daemon's user and
# its state directory, also created by postinst below.
sysusers=()
for f in "$systemd_dir"/*.sysusers.conf; do
    install -d -m 0755 "$root/usr/lib/sysusers.d"
    name=$(basename "$f" .sysusers.conf).conf
    install -m 0644 "$f" "$root/usr/lib/sysusers.d/$name"
    sysusers+=("$name")
done
tmpfiles=()
for f in "$systemd_dir"/*.tmpfiles.conf; do
    install -d -m 0755 "$root/usr/lib/tmpfiles.d"
    name=$(basename "$f" .tmpfiles.conf).conf
    install -m 0644 "$f" "$root/usr/lib/tmpfiles.d/$name"
    tmpfiles+=("$name")
done
# Optional drop-ins (the MQTT one) ship as examples, not active.
for f in "$systemd_dir"/*-*.conf; do
    install -d -m 0755 "$root/usr/share/doc/$pkg/examples"
    install -m 0644 "$f" "$root/usr/share/doc/$pkg/examples/"
done
shopt -u nullglob

# The unit's Documentation= opens this file, so it stays uncompressed.
install -m 0644 README.md "$root/usr/share/doc/$pkg/README.md"
# A native package's changelog, dated by the commit it is built from so
# that the same tree gives the same package.
when=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
printf '%s\n' \
    "$pkg ($version) stable; urgency=medium" "" \
    "  * Release $version, built from commit $commit." "" \
    " -- crystald maintainers <crystald@localhost>  $(LC_ALL=C date -R -u -d "@$when")" |
    gzip -9n >"$root/usr/share/doc/$pkg/changelog.gz"
chmod 0644 "$root/usr/share/doc/$pkg/changelog.gz"

cat >"$root/usr/share/doc/$pkg/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: crystald

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

# Depends from what the binaries link: the newest glibc symbol version
# they use, and libgcc_s (Rust's unwinder). Anything else is a new
# dependency someone has to add here on purpose.
glibc=$(for b in crystald crystal-quantize; do readelf -W --dyn-syms "$root/usr/bin/$b"; done |
    grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
[ -n "$glibc" ] || die "no glibc symbol versions found in the binaries"
if [ "$(printf '%s\n%s\n' "$glibc" "$max_glibc" | sort -V | tail -1)" != "$max_glibc" ]; then
    too_new=$(for b in crystald crystal-quantize; do
        readelf -W --dyn-syms "$root/usr/bin/$b" | awk -v b="$b" -v max="$max_glibc" '
            { for (i = 1; i <= NF; i++) if ($i ~ /@GLIBC_[0-9]/) {
                v = $i; sub(/.*@GLIBC_/, "", v)
                split(v, x, "."); split(max, m, ".")
                if (x[1] > m[1] || (x[1] == m[1] && x[2] + 0 > m[2] + 0)) print b ": " $i
            } }'
    done | sort -u | head -8 | tr '\n' ' ')
    die "the $arch binaries need glibc $glibc, newer than $max_glibc (${too_new% }); build them with cross/build.sh --release, which links against glibc $max_glibc"
fi
depends="libc6 (>= $glibc), adduser"
for lib in $(for b in crystald crystal-quantize; do readelf -d "$root/usr/bin/$b"; done |
    sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort -u); do
    case "$lib" in
        libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) ;;
        libgcc_s.so.1) depends="$depends, libgcc-s1" ;;
        *) die "binaries need $lib: add its package to Depends in this script" ;;
    esac
done

installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: crystald maintainers <crystald@localhost>
Installed-Size: $installed_kb
Depends: $depends
Section: net
Priority: optional
Description: CrystalChat 7B inference daemon for edge Linux devices
 crystald runs the CrystalChat 7B language model from a single int4/int8
 GGUF file on small machines (Raspberry Pi 4/5, Jetson Orin, x86-64
 servers), with SIMD kernels chosen at run time for the CPU it runs on.
 crystal-quantize converts a CrystalChat checkpoint into that file.
EOF

if [ ${#confs[@]} -gt 0 ]; then
    printf '%s\n' "${confs[@]}" >"$root/DEBIAN/conffiles"
fi

unit_list="${units[*]}"
sysusers_list="${sysusers[*]}"
tmpfiles_list="${tmpfiles[*]}"
# DPKG_ROOT: dpkg --root with --force-script-chrootless runs these scripts
# outside the target system (image builds; the packaging test).
cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    # The system user and group crystald, from the sysusers file where
    # systemd is there (idempotent), else with adduser.
    if [ -n "$sysusers_list" ] && command -v systemd-sysusers >/dev/null; then
        systemd-sysusers \${DPKG_ROOT:+--root="\$DPKG_ROOT"} $sysusers_list
    elif [ -n "\${DPKG_ROOT:-}" ]; then
        echo "crystald postinst: installing into DPKG_ROOT needs systemd-sysusers" >&2
        exit 1
    elif ! getent passwd crystald >/dev/null; then
        adduser --system --group --home /var/lib/crystald \\
            --gecos "crystald inference daemon" crystald
    fi
    # /var/lib/crystald, where the configuration expects the model: the
    # tmpfiles entry also brings it back at boot if it was removed.
    if [ -n "$tmpfiles_list" ] && command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles \${DPKG_ROOT:+--root="\$DPKG_ROOT"} --create $tmpfiles_list
    else
        install -d -o crystald -g crystald -m 0750 "\${DPKG_ROOT:-}/var/lib/crystald"
    fi
    if [ -z "\${DPKG_ROOT:-}" ] && [ -n "$unit_list" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # Not enabled here: the daemon needs a model path in
        # /etc/crystald first. An upgrade restarts what was running.
        if [ -n "\$2" ]; then
            for u in $unit_list; do systemctl try-restart "\$u" || true; done
        fi
    fi
fi
exit 0
EOF

cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] || [ "\$1" = deconfigure ]; then
    if [ -z "\${DPKG_ROOT:-}" ] && [ -n "$unit_list" ] && [ -d /run/systemd/system ]; then
        for u in $unit_list; do systemctl stop "\$u" || true; done
    fi
fi
exit 0
EOF

cat >"$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
case "\$1" in
    remove)
        if [ -z "\${DPKG_ROOT:-}" ] && [ -n "$unit_list" ] && [ -d /run/systemd/system ]; then
            for u in $unit_list; do systemctl stop "\$u" 2>/dev/null || true; done
            systemctl daemon-reload || true
        fi
        ;;
    purge)
        # Models a user put there are theirs: remove the directory only if empty.
        rmdir "\${DPKG_ROOT:-}/var/lib/crystald" 2>/dev/null || true
        ;;
esac
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out_dir"
deb=$out_dir/${pkg}_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null

# Check the result, not the staging tree: every file must be in the archive.
contents=$(dpkg-deb --contents "$deb")
info=$(dpkg-deb --info "$deb")
expect=(./usr/bin/crystald ./usr/bin/crystal-quantize)
for d in README.md copyright changelog.gz; do expect+=("./usr/share/doc/$pkg/$d"); done
for f in "${sysusers[@]}"; do expect+=("./usr/lib/sysusers.d/$f"); done
for f in "${tmpfiles[@]}"; do expect+=("./usr/lib/tmpfiles.d/$f"); done
for u in "${units[@]}"; do expect+=("./lib/systemd/system/$u"); done
for c in "${confs[@]}"; do expect+=(".$c"); done
for f in "${expect[@]}"; do
    grep -qE " $f\$" <<<"$contents" || die "$deb lacks $f"
done
for field in "Package: $pkg" "Version: $version" "Architecture: $arch" "Depends: libc6 (>= "; do
    grep -qF " $field" <<<"$info" || die "$deb control lacks '$field'"
done
for s in postinst prerm postrm; do
    grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\* +$s " <<<"$info" || die "$deb lacks an executable $s"
done
echo "package-deb.sh: $arch: ${#expect[@]} files, ${#units[@]} unit(s), ${#confs[@]} conffile(s); Depends: $depends" >&2
echo "$deb"
