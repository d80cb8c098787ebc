//! Who may talk to the daemon. The socket's mode and group are the first
//! gate; this is the second, from the peer's kernel-verified credentials
//! (`SO_PEERCRED`), so it holds even if the socket file is made wider.

use super::config::Principal;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};
use std::os::fd::AsFd;

/// The peer of a connection, as the kernel saw it at `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_of(sock: impl AsFd) -> std::io::Result<Peer> {
    let c = getsockopt(&sock, PeerCredentials)?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

#[derive(Clone, Debug, Default)]
struct AllowedGroup {
    gid: u32,
    /// User names listed as members in the group database.
    members: Vec<String>,
}

/// The resolved allow-lists; empty lists allow every peer that can open
/// the socket.
#[derive(Clone, Debug, Default)]
pub struct Access {
    users: Vec<u32>,
    groups: Vec<AllowedGroup>,
}

impl Access {
    /// Resolves names now, so a typo fails at start instead of locking
    /// everybody out silently.
    pub fn resolve(users: &[Principal], groups: &[Principal]) -> Result<Access, String> {
        let users = users
            .iter()
            .map(|u| match u {
                Principal::Id(id) => Ok(*id),
                Principal::Name(name) => User::from_name(name)
                    .map_err(|e| format!("looking up user '{name}': {e}"))?
                    .map(|u| u.uid.as_raw())
                    .ok_or_else(|| format!("allowed_users: no user named '{name}'")),
            })
            .collect::<Result<_, String>>()?;
        let groups = groups
            .iter()
            .map(|g| {
                let found = match g {
                    Principal::Id(id) => Group::from_gid(Gid::from_raw(*id)),
                    Principal::Name(name) => Group::from_name(name),
                }
                .map_err(|e| format!("looking up group {g:?}: {e}"))?;
                match (found, g) {
                    (Some(gr), _) => Ok(AllowedGroup {
                        gid: gr.gid.as_raw(),
                        members: gr.mem,
                    }),
                    // A numeric gid need not be in the database to be checked.
                    (None, Principal::Id(id)) => Ok(AllowedGroup {
                        gid: *id,
                        members: Vec::new(),
                    }),
                    (None, Principal::Name(name)) => {
                        Err(format!("allowed_groups: no group named '{name}'"))
                    }
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(Access { users, groups })
    }

    pub fn is_open(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }

    pub fn allows(&self, peer: &Peer) -> bool {
        if self.is_open() || self.users.contains(&peer.uid) {
            return true;
        }
        if self.groups.iter().any(|g| g.gid == peer.gid) {
            return true;
        }
        // Supplementary groups: looked up only when needed, by user name.
        let name = User::from_uid(Uid::from_raw(peer.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        name.is_some_and(|n| self.groups.iter().any(|g| g.members.contains(&n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_allow_by_uid_and_gid() {
        let peer = Peer {
            pid: 1,
            uid: 4242,
            gid: 4343,
        };
        assert!(Access::default().allows(&peer));
        let only_root = Access::resolve(&[Principal::Id(0)], &[]).unwrap();
        assert!(!only_root.allows(&peer));
        let by_gid = Access::resolve(&[], &[Principal::Id(4343)]).unwrap();
        assert!(by_gid.allows(&peer));
        let root_by_name = Access::resolve(&[Principal::Name("root".into())], &[]).unwrap();
        assert!(root_by_name.allows(&Peer { uid: 0, ..peer }));
        assert!(Access::resolve(&[Principal::Name("no-such-user-xyz".into())], &[]).is_err());
    }
}
