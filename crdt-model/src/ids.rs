//! Identifier newtypes. Ids never cross a crate boundary as bare strings.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The global id of a record: a UUID (any version, hyphenated, stored in lower
/// case) or a ULID (26 characters of Crockford base32, stored in upper case).
/// Ids are minted where a record is created, so two sites never mint the same.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecordId(String);

impl RecordId {
    /// Parses and normalizes a UUID or ULID string.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if is_uuid(s) {
            return Ok(RecordId(s.to_ascii_lowercase()));
        }
        if is_ulid(s) {
            return Ok(RecordId(s.to_ascii_uppercase()));
        }
        Err(ModelError::InvalidId(s.to_string()))
    }

    /// Makes a UUIDv7 from a millisecond timestamp and 10 random bytes the
    /// caller supplies (the model takes no clock and no randomness of its own).
    pub fn new_v7(unix_ms: u64, random: [u8; 10]) -> Self {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
        b[6] = 0x70 | (random[0] & 0x0f);
        b[7] = random[1];
        b[8] = 0x80 | (random[2] & 0x3f);
        b[9..].copy_from_slice(&random[3..]);
        let h = hex_lower(&b);
        RecordId(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_ulid(s: &str) -> bool {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let b = s.as_bytes();
    b.len() == 26 && b[0] <= b'7' && b.iter().all(|c| ALPHABET.contains(&c.to_ascii_uppercase()))
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RecordId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self> {
        RecordId::parse(&s)
    }
}

impl From<RecordId> for String {
    fn from(id: RecordId) -> String {
        id.0
    }
}

/// A node's identity inside records: 16 bytes, shown as 32 hex digits. It is
/// also the node's Automerge actor id, so every change names the site that
/// made it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Result<Self> {
        let bytes = hex_decode(s).ok_or_else(|| ModelError::InvalidId(s.to_string()))?;
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| ModelError::InvalidId(s.to_string()))?;
        Ok(NodeId(arr))
    }

    /// The Automerge actor this node writes with.
    pub fn actor(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }

    /// The node that made a change by `actor`. Actors that Automerge derives
    /// for isolated transactions end with the base actor's bytes, so the last
    /// 16 bytes name the node in both cases.
    pub fn from_actor(actor: &automerge::ActorId) -> Option<NodeId> {
        let b = actor.to_bytes();
        if b.len() < 16 {
            return None;
        }
        let mut arr = [0u8; 16];
        arr.copy_from_slice(&b[b.len() - 16..]);
        Some(NodeId(arr))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_lower(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl TryFrom<String> for NodeId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self> {
        NodeId::parse(&s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.to_string()
    }
}

/// A collision's deterministic id: the first 16 bytes of a BLAKE3 hash of what
/// the collision is about, as 32 hex digits. Every node that has the same
/// changes names the collision the same.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CollisionId(String);

impl CollisionId {
    /// Derives the id from the canonical description of the collision.
    pub fn derive(parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        CollisionId(hex_lower(&h.finalize().as_bytes()[..16]))
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s.len() == 32 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
            Ok(CollisionId(s))
        } else {
            Err(ModelError::InvalidId(s))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CollisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CollisionId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self> {
        CollisionId::parse(&s)
    }
}

impl From<CollisionId> for String {
    fn from(id: CollisionId) -> String {
        id.0
    }
}

/// Lower-case hex of some bytes.
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Decodes hex (either case); `None` on odd length or a non-hex digit.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_and_ulid_parse_and_normalize() {
        let u = RecordId::parse("0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B").unwrap();
        assert_eq!(u.as_str(), "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        let l = RecordId::parse("01arz3ndektsv4rrffq69g5fav").unwrap();
        assert_eq!(l.as_str(), "01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert!(RecordId::parse("not-an-id").is_err());
        assert!(
            RecordId::parse("81ARZ3NDEKTSV4RRFFQ69G5FAV").is_err(),
            "ULID overflow"
        );
    }

    #[test]
    fn v7_ids_are_valid_uuids_sorted_by_time() {
        let a = RecordId::new_v7(1_700_000_000_000, [0xff; 10]);
        let b = RecordId::new_v7(1_700_000_000_001, [0; 10]);
        assert!(RecordId::parse(a.as_str()).is_ok());
        assert_eq!(&a.as_str()[14..15], "7");
        assert!(a < b);
    }

    #[test]
    fn node_id_round_trips_through_actor() {
        let n = NodeId([7; 16]);
        assert_eq!(NodeId::from_actor(&n.actor()), Some(n));
        assert_eq!(NodeId::parse(&n.to_string()).unwrap(), n);
    }
}
