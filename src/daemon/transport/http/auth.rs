//! API keys: bearer tokens from a file, compared in constant time so the
//! time a refusal takes says nothing about how much of a key was right.

use std::path::Path;
use subtle::ConstantTimeEq;

pub struct Keys {
    keys: Vec<Vec<u8>>,
}

impl Keys {
    /// One key per line; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<Keys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("http.api_key_file {}: {e}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(format!(
                "http.api_key_file {}: no keys in the file",
                path.display()
            ));
        }
        Ok(Keys { keys })
    }

    /// Whether an `Authorization` header value carries one of the keys.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(|v| {
            let v = v.trim_ascii();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
        }) else {
            return false;
        };
        // Every key is compared, whatever matched, so the time taken does
        // not tell which key (or how many) there are.
        self.keys
            .iter()
            .fold(subtle::Choice::from(0), |found, k| {
                found | k.as_slice().ct_eq(token)
            })
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_from_the_file_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# ops\nsk-one\n\n  sk-two  \n").unwrap();
        let keys = Keys::load(&path).unwrap();
        assert!(keys.allows(Some(b"Bearer sk-one")));
        assert!(keys.allows(Some(b"bearer  sk-two ")));
        for bad in [
            &b"Bearer sk-on"[..],
            b"Bearer sk-one2",
            b"sk-one",
            b"Basic sk-one",
            b"Bearer ",
            b"",
        ] {
            assert!(!keys.allows(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!keys.allows(None));
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(Keys::load(&path).err().unwrap().contains("no keys"));
        assert!(Keys::load(&dir.path().join("missing")).is_err());
    }
}
