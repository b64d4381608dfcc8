//! The API's bearer token: 256 random bits as hex, kept in the data dir in a
//! file only its owner can read.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Name of the token file in a data dir.
pub const TOKEN_FILE: &str = "api-token";
/// Random bytes in a token (256 bits, above the 128 required).
const TOKEN_BYTES: usize = 32;

/// The token file of a data dir.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// Reads the data dir's token, making one (mode 0600) if there is none.
pub fn load_or_create(data_dir: &Path) -> std::io::Result<String> {
    let p = path(data_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let mut raw = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let token = entente_model::ids::hex_lower(&raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&p)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(token)
}

/// Reads the data dir's token, if there is one.
pub fn read(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(path(data_dir))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Compares without stopping at the first differing byte.
pub fn matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_owner_only_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let t = load_or_create(dir.path()).unwrap();
        assert_eq!(t.len(), TOKEN_BYTES * 2);
        assert_eq!(load_or_create(dir.path()).unwrap(), t);
        assert_eq!(read(dir.path()).as_deref(), Some(t.as_str()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches(&t, &t));
        assert!(!matches(&t[1..], &t));
        assert!(!matches("", ""));
    }
}
