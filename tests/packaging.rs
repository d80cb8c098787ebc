//! `cross/package-deb.sh` on this machine's own binaries (amd64): the
//! package must hold both binaries, the systemd units and configuration it
//! was given, conffiles for the configuration, and maintainer scripts that
//! parse. Needs `dpkg-deb` (every Debian system has it) and the
//! `crystal-quantize` binary, which `cargo test --workspace` builds.
//! The ARM package is built and checked by `cross/package-deb.sh arm64` in
//! scripts/test.sh; this file only runs where the binaries are amd64.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The directory with this build's crystald and crystal-quantize.
fn bin_dir() -> PathBuf {
    let crystald = Path::new(env!("CARGO_BIN_EXE_crystald"));
    let dir = crystald.parent().unwrap().to_path_buf();
    assert!(
        dir.join("crystal-quantize").exists(),
        "{} has no crystal-quantize: run `cargo test --workspace` (or `cargo build -p crystal-quantize`)",
        dir.display()
    );
    dir
}

#[test]
fn amd64_package_holds_binaries_units_and_conffiles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("systemd");
    std::fs::create_dir(&units).unwrap();
    std::fs::write(units.join("crystald.service"), "[Service]\n").unwrap();
    std::fs::write(units.join("crystald.socket"), "[Socket]\n").unwrap();
    std::fs::write(units.join("crystald.toml"), "threads = 4\n").unwrap();
    std::fs::write(units.join("crystald-mqtt.conf"), "[Service]\n").unwrap();
    std::fs::write(units.join("notes.txt"), "not packaged\n").unwrap();
    let out = tmp.path().join("out");

    let printed = run(Command::new(root.join("cross/package-deb.sh"))
        .arg("amd64")
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(&out)
        .arg("--systemd-dir")
        .arg(&units));
    let deb = PathBuf::from(printed.lines().last().expect("the .deb path"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb,
        out.join(format!("crystald_{version}_amd64.deb")),
        "package file name"
    );

    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let files: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for want in [
        "./usr/bin/crystald",
        "./usr/bin/crystal-quantize",
        "./lib/systemd/system/crystald.service",
        "./lib/systemd/system/crystald.socket",
        "./etc/crystald/crystald.toml",
        "./usr/share/doc/crystald/copyright",
        "./usr/share/doc/crystald/examples/crystald-mqtt.conf",
    ] {
        assert!(files.contains(&want), "{want} missing from:\n{contents}");
    }
    assert!(
        !files.iter().any(|f| f.ends_with("notes.txt")),
        "only units and .toml files are packaged:\n{contents}"
    );
    for bin in ["./usr/bin/crystald", "./usr/bin/crystal-quantize"] {
        let line = contents.lines().find(|l| l.ends_with(bin)).unwrap();
        assert!(
            line.starts_with("-rwxr-xr-x root/root"),
            "{bin}: mode/owner: {line}"
        );
    }

    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: crystald".to_string(),
        format!("Version: {version}"),
        "Architecture: amd64".to_string(),
        "Maintainer: ".to_string(),
        "Depends: libc6 (>= 2.".to_string(),
        "Description: ".to_string(),
    ] {
        assert!(info.contains(&field), "control lacks {field}:\n{info}");
    }
    let conffiles = run(Command::new("dpkg-deb")
        .args(["--info"])
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/crystald/crystald.toml");

    // The maintainer scripts must at least parse, create the user
    // idempotently and stop the units.
    let ctl = tmp.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&ctl));
    for s in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(ctl.join(s)));
    }
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(
        postinst.contains("getent passwd crystald")
            && postinst.contains("adduser --system --group")
    );
    let prerm = std::fs::read_to_string(ctl.join("prerm")).unwrap();
    assert!(
        prerm.contains("systemctl stop") && prerm.contains("crystald.socket crystald.service"),
        "prerm stops the socket, then the service:\n{prerm}"
    );
}
