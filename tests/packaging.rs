//! `cross/package-deb.sh` on this machine's own binaries (amd64): the
//! package must hold both binaries, the systemd units, sysusers and
//! tmpfiles entries and configuration it was given, conffiles for the
//! configuration, the documentation a Debian package has, and maintainer
//! scripts that work: it is installed into a temporary root with dpkg
//! (`--root` with `--force-script-chrootless`, so the scripts really run,
//! on `DPKG_ROOT`) and the daemon is started as the user they created.
//! Needs `dpkg`, `systemd-sysusers` and `systemd-tmpfiles` (scripts/setup.sh
//! installs them), root (to own files as that user; CI runs as root) and
//! the `crystal-quantize` binary, which `cargo test --workspace` builds.
//!
//! The test build is linked against this machine's glibc, so it is
//! packaged with `--max-glibc` set to that; the release binaries' limit
//! (2.31) is checked by `cross/package-deb.sh` in scripts/test.sh, for
//! both architectures. This file only runs where the binaries are amd64.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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

/// This machine's glibc version, which the test build links against.
fn host_glibc() -> String {
    let v = run(Command::new("getconf").arg("GNU_LIBC_VERSION"));
    v.trim()
        .strip_prefix("glibc ")
        .unwrap_or_else(|| panic!("getconf GNU_LIBC_VERSION: {v}"))
        .to_string()
}

/// Runs package-deb.sh for amd64 on the test build; returns its output.
fn package(systemd: &Path, out: &Path, max_glibc: Option<&str>) -> Output {
    let mut cmd = Command::new(root_dir().join("cross/package-deb.sh"));
    cmd.arg("amd64")
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out)
        .arg("--systemd-dir")
        .arg(systemd);
    if let Some(v) = max_glibc {
        cmd.args(["--max-glibc", v]);
    }
    output(&mut cmd)
}

/// The package built from the test build and `systemd`; its path.
fn build_deb(systemd: &Path, out: &Path) -> PathBuf {
    let o = package(systemd, out, Some(&host_glibc()));
    assert!(
        o.status.success(),
        "package-deb.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let printed = String::from_utf8(o.stdout).unwrap();
    let deb = PathBuf::from(printed.lines().last().expect("the .deb path"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb,
        out.join(format!("crystald_{version}_amd64.deb")),
        "package file name"
    );
    deb
}

#[test]
fn amd64_package_holds_binaries_units_docs_and_conffiles() {
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("systemd");
    std::fs::create_dir(&units).unwrap();
    for (name, text) in [
        ("crystald.service", "[Service]\n"),
        ("crystald.socket", "[Socket]\n"),
        ("crystald.toml", "threads = 4\n"),
        ("crystald-mqtt.conf", "[Service]\n"),
        (
            "crystald.sysusers.conf",
            "u crystald - \"x\" /var/lib/crystald\n",
        ),
        (
            "crystald.tmpfiles.conf",
            "d /var/lib/crystald 0750 crystald crystald -\n",
        ),
        ("notes.txt", "not packaged\n"),
    ] {
        std::fs::write(units.join(name), text).unwrap();
    }
    let deb = build_deb(&units, &tmp.path().join("out"));
    let version = env!("CARGO_PKG_VERSION");

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
        "./usr/lib/sysusers.d/crystald.conf",
        "./usr/lib/tmpfiles.d/crystald.conf",
        "./etc/crystald/crystald.toml",
        "./usr/share/doc/crystald/README.md",
        "./usr/share/doc/crystald/copyright",
        "./usr/share/doc/crystald/changelog.gz",
        "./usr/share/doc/crystald/examples/crystald-mqtt.conf",
    ] {
        assert!(files.contains(&want), "{want} missing from:\n{contents}");
    }
    assert!(
        !files.iter().any(|f| f.ends_with("notes.txt")),
        "only units, sysusers/tmpfiles entries and .toml files are packaged:\n{contents}"
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

    // The changelog is a Debian changelog: `dpkg-parsechangelog` reads it.
    let x = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    let gz = std::fs::read(x.join("usr/share/doc/crystald/changelog.gz")).unwrap();
    let mut gunzip = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    gunzip.stdin.take().unwrap().write_all(&gz).unwrap();
    let mut changelog = String::new();
    gunzip
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut changelog)
        .unwrap();
    assert!(gunzip.wait().unwrap().success());
    let cl = tmp.path().join("changelog");
    std::fs::write(&cl, &changelog).unwrap();
    let parsed = run(Command::new("dpkg-parsechangelog").arg("-l").arg(&cl));
    assert!(
        parsed.contains("Source: crystald") && parsed.contains(&format!("Version: {version}")),
        "{parsed}\n{changelog}"
    );
    assert_eq!(
        std::fs::read(x.join("usr/share/doc/crystald/README.md")).unwrap(),
        std::fs::read(root_dir().join("README.md")).unwrap()
    );

    // The maintainer scripts must at least parse and stop the units.
    let ctl = tmp.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&ctl));
    for s in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(ctl.join(s)));
    }
    let prerm = std::fs::read_to_string(ctl.join("prerm")).unwrap();
    assert!(
        prerm.contains("systemctl stop") && prerm.contains("crystald.socket crystald.service"),
        "prerm stops the socket, then the service:\n{prerm}"
    );
}

#[test]
fn binaries_that_need_a_newer_glibc_than_allowed_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // The default limit, 2.31, against the test build of a newer glibc.
    let host = host_glibc();
    let o = package(&root_dir().join("systemd"), &out, None);
    let err = String::from_utf8_lossy(&o.stderr);
    let newer = |v: &str| {
        let p: Vec<u32> = v.split('.').map(|x| x.parse().unwrap()).collect();
        p > vec![2, 31]
    };
    assert!(
        newer(&host),
        "this test expects a build host newer than glibc 2.31"
    );
    assert!(
        !o.status.success(),
        "glibc {host} binaries were packaged: {err}"
    );
    assert!(
        err.contains("newer than 2.31") && err.contains("@GLIBC_2.3"),
        "the error names the limit and symbols: {err}"
    );
    // Any limit below what std itself needs is refused the same way.
    let o = package(&root_dir().join("systemd"), &out, Some("2.2"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("newer than 2.2"),
        "{err}"
    );
    assert!(
        !out.join(format!("crystald_{}_amd64.deb", env!("CARGO_PKG_VERSION")))
            .exists(),
        "a refused package must not be left behind"
    );
}

/// Uid and gid of `name` in the passwd file under `root`.
fn user_in(root: &Path, name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no user {name} in {passwd}"));
    let f: Vec<&str> = line.split(':').collect();
    assert_eq!(f[5], "/var/lib/crystald", "home: {line}");
    assert!(f[6].ends_with("nologin"), "shell: {line}");
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

#[test]
fn installed_with_dpkg_the_daemon_runs_as_its_user_from_var_lib_crystald() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "installing a package into a temporary root needs root (CI runs as root)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(&root_dir().join("systemd"), &tmp.path().join("out"));
    // A traversable path for the daemon's user down to the root.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.path().join("root");
    let admin = root.join("var/lib/dpkg");
    for d in ["updates", "info"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    for f in ["status", "available"] {
        std::fs::write(admin.join(f), "").unwrap();
    }
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--log=/dev/null"])
            .args(args);
        cmd
    };
    // Dependencies (libc6, adduser, libgcc-s1) are not in the empty root.
    run(dpkg(&["--force-depends", "-i"]).arg(&deb));

    // postinst made the user (from the packaged sysusers file) and its
    // state directory (from the tmpfiles entry), where the config wants
    // the model.
    let (uid, gid) = user_in(&root, "crystald");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");
    let state = root.join("var/lib/crystald");
    let meta = std::fs::metadata(&state).expect("/var/lib/crystald created");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (uid, gid, 0o750),
        "owner and mode of /var/lib/crystald"
    );
    let config = std::fs::read_to_string(root.join("etc/crystald/crystald.toml")).unwrap();
    assert!(config.contains("model = \"/var/lib/crystald/model.gguf\""));
    // The documentation a Debian package has, and the unit points at it.
    let doc = root.join("usr/share/doc/crystald");
    for f in ["README.md", "copyright", "changelog.gz"] {
        assert!(doc.join(f).is_file(), "/usr/share/doc/crystald/{f} missing");
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/crystald.service")).unwrap();
    let docs: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert!(!docs.is_empty(), "the unit has no Documentation=");
    for d in docs {
        let path = d
            .strip_prefix("file:")
            .unwrap_or_else(|| panic!("Documentation={d}: not a file the package installs"));
        assert!(
            root.join(path.trim_start_matches('/')).is_file(),
            "Documentation={d} is not in the package"
        );
    }

    // An administrator puts a model there; the installed daemon, started
    // as crystald, reads it and answers.
    let model = state.join("model.gguf");
    std::fs::copy(common::converted("tiny-a", "q4_0"), &model).unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    nix::unistd::chown(
        &run_dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .unwrap();
    let sock = run_dir.join("crystald.sock");
    // setpriv (util-linux): as systemd's User=/Group= do, with no
    // supplementary groups left from root.
    let mut daemon = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--"])
        .arg(root.join("usr/bin/crystald"))
        .args([
            "serve",
            "--threads",
            "1",
            "--ctx",
            common::services::CTX,
            "--config",
        ])
        .arg(root.join("etc/crystald/crystald.toml"))
        .arg("--model")
        .arg(&model)
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        if let Some(status) = daemon.try_wait().unwrap() {
            let mut err = String::new();
            daemon
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the daemon exited ({status}) as its user: {err}");
        }
        assert!(Instant::now() < until, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(b"{\"id\": 1, \"prompt\": \"Hi\", \"max_tokens\": 2, \"temperature\": 0}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["event"], "done", "{line}");

    // Purge: the package's files go; the directory stays while it holds
    // the user's model, and goes once empty.
    run(&mut dpkg(&["--purge", "crystald"]));
    assert!(!root.join("usr/bin/crystald").exists());
    assert!(
        !root.join("etc/crystald/crystald.toml").exists(),
        "purge removes conffiles"
    );
    assert!(model.exists(), "purge must not delete the user's model");
    std::fs::remove_file(&model).unwrap();
    run(dpkg(&["--force-depends", "-i"]).arg(&deb));
    run(&mut dpkg(&["--purge", "crystald"]));
    assert!(
        !state.exists(),
        "an empty /var/lib/crystald goes with purge"
    );
}
