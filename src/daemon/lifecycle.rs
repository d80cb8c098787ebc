//! Starting and stopping: the listening socket (bound here or handed over
//! by systemd), signals, and the systemd notification protocol.

use crate::daemon::logging::{log_debug, log_warn};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Sends one `sd_notify` message (`READY=1`, `STATUS=...`) when running
/// under systemd with `Type=notify`; a no-op otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(Path::new(&path), state) {
        log_warn!(
            "cannot notify systemd ({}): {e}",
            Path::new(&path).display()
        );
    }
}

fn send_notify(path: &Path, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_encoded_bytes();
    // "@name" is a Linux abstract socket address.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// Watchdog keep-alives every half `WATCHDOG_USEC` while `healthy()` holds,
/// when systemd asked for them (`WatchdogSec=`). Stopping the pings on a
/// dead worker lets systemd restart a daemon that can no longer answer.
pub fn start_watchdog(healthy: impl Fn() -> bool + Send + 'static) -> Option<Arc<AtomicBool>> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::Builder::new()
        .name("crystald-watchdog".into())
        .spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if healthy() {
                    notify("WATCHDOG=1");
                } else {
                    log_warn!("inference worker is not running; withholding watchdog pings");
                }
                std::thread::sleep(period);
            }
        })
        .ok()?;
    log_debug!("watchdog: pinging every {:?}", period);
    Some(stop)
}

/// The file descriptor systemd passes first (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed (socket activation), if any.
pub fn inherited_listener() -> Result<Option<UnixListener>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    // The variables may have been inherited from a parent that was activated.
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    // Children must not believe the socket is theirs.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    match fds.parse::<u32>() {
        Ok(1) => {}
        Ok(n) => {
            return Err(format!(
                "systemd passed {n} sockets; crystald.socket must have exactly one ListenStream="
            ))
        }
        Err(_) => return Err(format!("LISTEN_FDS is not a number: '{fds}'")),
    }
    let listener = adopt_listen_fd();
    check_listener(&listener)?;
    Ok(Some(listener))
}

#[allow(unsafe_code)]
fn adopt_listen_fd() -> UnixListener {
    use std::os::fd::{FromRawFd, OwnedFd};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    assert!(
        !TAKEN.swap(true, Ordering::SeqCst),
        "the socket-activation descriptor is adopted once"
    );
    // SAFETY: systemd's socket-activation contract (sd_listen_fds(3)): with
    // LISTEN_PID equal to our pid and LISTEN_FDS=1, descriptor 3 is an open
    // socket handed to this process and owned by nobody else in it. The
    // variables are removed above and `TAKEN` guards against a second call,
    // so exactly one OwnedFd ever owns it. No safe API can express taking
    // ownership of an inherited descriptor; this is the only unsafe code of
    // the daemon.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    UnixListener::from(fd)
}

fn check_listener(l: &UnixListener) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt, AddressFamily, SockType, SockaddrLike};
    let ty = getsockopt(l, sockopt::SockType)
        .map_err(|e| format!("passed descriptor 3 is not a socket: {e}"))?;
    let listening = getsockopt(l, sockopt::AcceptConn).unwrap_or(false);
    let family = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(
        std::os::fd::AsRawFd::as_raw_fd(l),
    )
    .ok()
    .and_then(|a| a.family());
    if ty != SockType::Stream || !listening || family != Some(AddressFamily::Unix) {
        return Err(
            "the socket systemd passed is not a listening Unix stream socket (ListenStream=/path)"
                .into(),
        );
    }
    Ok(())
}

/// A socket this process bound; the file is removed on drop.
#[derive(Debug)]
pub struct BoundSocket {
    pub path: PathBuf,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` with permission bits `mode` and, when given, group `group`.
///
/// A socket file that nobody answers on is left over from a crash and is
/// replaced; one with a live daemon behind it is an error, and so is any
/// other kind of file at the path.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<(UnixListener, BoundSocket), String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "another daemon is already listening on {shown}; stop it first or use --socket"
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log_debug!("removing stale socket {shown}");
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove stale socket {shown}: {e}"))?;
            }
            Err(e) => return Err(format!("cannot check existing socket {shown}: {e}")),
        },
        Ok(_) => {
            return Err(format!(
                "{shown} exists and is not a socket; refusing to replace it"
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot check {shown}: {e}")),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    }
    let gid = match group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| format!("looking up socket_group '{name}': {e}"))?
                .ok_or_else(|| format!("socket_group: no group named '{name}'"))?
                .gid,
        ),
    };
    // The socket is created owner-only and widened to `mode` once its group
    // is right, so no other user can connect in between.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    let guard = BoundSocket {
        path: path.to_path_buf(),
    };
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {shown} to group {}: {e}", group.unwrap_or("")))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
    Ok((listener, guard))
}

/// SIGINT/SIGTERM (and SIGHUP) as messages: the first asks for a graceful
/// stop, later ones to stop waiting for the running request.
pub fn signals() -> Result<mpsc::Receiver<()>, String> {
    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send_notify(&path, "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn abstract_notify_addresses_work() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("crystald-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send_notify(Path::new(&format!("@{name}")), "STATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x");
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/d.sock");
        let (live, guard) = bind(&path, 0o660, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = bind(&path, 0o660, None).unwrap_err();
        assert!(e.contains("already listening"), "{e}");
        // A crash leaves the file behind with nobody listening.
        drop(live);
        std::mem::forget(guard);
        assert!(path.exists());
        let (_l, _g) = bind(&path, 0o600, None).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = bind(&file, 0o660, None).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
    }
}
