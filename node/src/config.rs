//! A node's configuration and its data dir.
//!
//! `entente init` lays out a data dir; `entente serve` reads it back:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `identity.key` | the node's Ed25519 keypair (libp2p protobuf encoding) | 0600 |
//! | `config.toml` | the [`Config`] (TOML), every key optional | 0644 |
//! | `api-token` | the HTTP API's bearer token, 32 random bytes in hex | 0600 |
//! | `db/` | the RocksDB store | |
//!
//! The node id written into every Automerge change ([`NodeId`]) is derived
//! from the libp2p identity: the first 16 bytes of the BLAKE3 hash of the
//! peer id's bytes ([`node_id_for`]). A data dir whose store already holds
//! another node id (it was made with a different key) is refused, so the
//! actor ids in the history always name the key that signs the node's
//! traffic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use entente_model::NodeId;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the identity inside a data dir.
pub const IDENTITY_FILE: &str = "identity.key";
/// File name of the default config inside a data dir.
pub const CONFIG_FILE: &str = "config.toml";
/// File name of the API token inside a data dir.
pub const TOKEN_FILE: &str = "api-token";
/// The RocksDB directory inside a data dir.
pub const DB_DIR: &str = "db";
/// Bytes of randomness in an API token (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// Everything `entente serve` needs besides the data dir. Every key has a
/// default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of the cluster: nodes gossip on the topic `entente/<cluster>/push`
    /// and only hear pushes of their own cluster.
    pub cluster: String,
    /// Multiaddrs to listen on, TCP (`/ip4/0.0.0.0/tcp/4001`) or QUIC
    /// (`/ip4/0.0.0.0/udp/4001/quic-v1`; not with a cluster key).
    pub listen: Vec<Multiaddr>,
    /// Static peers, `MULTIADDR/p2p/PEER_ID`: allow-listed, dialed at start
    /// and redialed with exponential backoff while unreachable.
    pub peers: Vec<Multiaddr>,
    /// Further peer ids allowed to connect (they dial us; we do not dial them).
    #[serde(with = "peer_ids")]
    pub allow: Vec<PeerId>,
    /// Address of the HTTP API.
    pub api: SocketAddr,
    /// Require the API token even on a loopback address (it is always
    /// required on any other address).
    pub api_require_token: bool,
    /// mDNS discovery on the LAN (discovered peers are dialed only if allowed).
    pub mdns: bool,
    /// A schema TOML file; the built-in CRM schema when absent.
    pub schema: Option<PathBuf>,
    /// The cluster's pre-shared key (libp2p private network, the
    /// `/key/swarm/psk/1.0.0/` file format, mode 0600): every connection is
    /// encrypted with it before anything else is said, so a node without
    /// the same key cannot even begin a handshake. Absent: no key (the
    /// allow-list alone decides who may talk to the node).
    pub cluster_key_file: Option<PathBuf>,
    /// Network limits.
    pub limits: Limits,
    /// Replication timing.
    pub sync: SyncTuning,
}

/// Connection and message limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections to one peer.
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Yamux streams per connection.
    pub max_streams_per_connection: usize,
    /// A replication message must be acknowledged within this time (s).
    pub request_timeout_secs: u64,
    /// Largest gossip message (bytes); pushes are ids and heads only.
    pub max_gossip_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_connections_per_peer: 2,
            max_pending_incoming: 16,
            max_streams_per_connection: 32,
            request_timeout_secs: 60,
            max_gossip_bytes: 64 << 10,
        }
    }
}

/// Replication timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncTuning {
    /// Anti-entropy: an idle session pulls its peer's feed this often (ms).
    pub pull_interval_ms: u64,
    /// First redial delay of an unreachable static peer (ms); doubles per
    /// failure up to `redial_max_ms`.
    pub redial_min_ms: u64,
    /// Longest redial delay (ms).
    pub redial_max_ms: u64,
    /// Partial replication: the collections this node replicates (pulls,
    /// stores and serves); empty or absent: all of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub collections: Vec<String>,
    /// A node whose store is empty takes its first peer's records whole, in
    /// bulk pages; off, it pulls feed pages and fetches like any node.
    pub bulk_full_sync: bool,
}

impl Default for SyncTuning {
    fn default() -> Self {
        SyncTuning {
            pull_interval_ms: 2_000,
            redial_min_ms: 500,
            redial_max_ms: 30_000,
            collections: Vec::new(),
            bulk_full_sync: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: "default".into(),
            listen: vec!["/ip4/0.0.0.0/tcp/4001".parse().expect("valid multiaddr")],
            peers: Vec::new(),
            allow: Vec::new(),
            api: crate::api::DEFAULT_ADDR
                .parse()
                .expect("valid socket address"),
            api_require_token: false,
            mdns: false,
            schema: None,
            cluster_key_file: None,
            limits: Limits::default(),
            sync: SyncTuning::default(),
        }
    }
}

impl Config {
    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// Checks what the types cannot: every static peer names its peer id,
    /// limits are positive.
    pub fn validate(&self) -> Result<()> {
        for addr in &self.peers {
            peer_of(addr)?;
        }
        if self.cluster.is_empty() || self.cluster.len() > 64 {
            return Err(Error::Config("cluster must be 1 to 64 bytes".into()));
        }
        let l = &self.limits;
        if l.max_connections == 0
            || l.max_connections_per_peer == 0
            || l.max_pending_incoming == 0
            || l.max_streams_per_connection < 4
            || l.request_timeout_secs == 0
            || l.max_gossip_bytes < 1024
        {
            return Err(Error::Config(
                "limits must be positive (streams at least 4, gossip at least 1024 bytes)".into(),
            ));
        }
        for a in self.listen.iter().chain(&self.peers) {
            check_transport(self.cluster_key_file.is_some(), a)?;
        }
        let s = &self.sync;
        if s.pull_interval_ms == 0 || s.redial_min_ms == 0 || s.redial_max_ms < s.redial_min_ms {
            return Err(Error::Config(
                "sync timings must be positive, redial_max_ms ≥ redial_min_ms".into(),
            ));
        }
        Ok(())
    }
}

/// Peer ids as their base58 strings in TOML.
mod peer_ids {
    use libp2p::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ids: &[PeerId], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(|p| p.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PeerId>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The peer id at the end of `MULTIADDR/p2p/PEER_ID`.
pub fn peer_of(addr: &Multiaddr) -> Result<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Ok(p),
        _ => Err(Error::Config(format!(
            "peer address {addr} must end in /p2p/PEER_ID"
        ))),
    }
}

/// The store's node id for a libp2p peer id: the first 16 bytes of
/// BLAKE3(peer id bytes).
pub fn node_id_for(peer: &PeerId) -> NodeId {
    let hash = blake3::hash(&peer.to_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&hash.as_bytes()[..16]);
    NodeId(id)
}

/// The files of one data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What `init` made (or found).
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The node's peer id.
    pub peer_id: PeerId,
    /// Its store node id.
    pub node_id: NodeId,
    /// The config written (or found).
    pub config: Config,
    /// Whether the identity was created now (false: it existed).
    pub created: bool,
}

impl DataDir {
    /// A data dir at `root` (nothing is touched yet).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `identity.key`.
    pub fn identity_path(&self) -> PathBuf {
        self.root.join(IDENTITY_FILE)
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// `api-token`.
    pub fn token_path(&self) -> PathBuf {
        self.root.join(TOKEN_FILE)
    }

    /// `db/`.
    pub fn db_path(&self) -> PathBuf {
        self.root.join(DB_DIR)
    }

    /// Creates the dir, an identity, a default config and an API token,
    /// keeping whichever of them exist already (init is idempotent and never
    /// replaces a key).
    pub fn init(&self) -> Result<InitReport> {
        std::fs::create_dir_all(&self.root)?;
        let created = !self.identity_path().exists();
        let key = if created {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| Error::Config(format!("encoding the identity: {e}")))?;
            write_private(&self.identity_path(), &bytes)?;
            key
        } else {
            self.load_identity()?
        };
        if !self.token_path().exists() {
            let mut token = [0u8; TOKEN_BYTES];
            getrandom::fill(&mut token)
                .map_err(|e| Error::Config(format!("no OS randomness: {e}")))?;
            write_private(&self.token_path(), hex::encode(token).as_bytes())?;
        }
        let config = if self.config_path().exists() {
            Config::load(&self.config_path())?
        } else {
            let c = Config::default();
            std::fs::write(self.config_path(), c.to_toml())?;
            c
        };
        let peer_id = key.public().to_peer_id();
        Ok(InitReport {
            peer_id,
            node_id: node_id_for(&peer_id),
            config,
            created,
        })
    }

    /// Reads the identity (refusing a key file others may read).
    pub fn load_identity(&self) -> Result<Keypair> {
        let path = self.identity_path();
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::Config(format!(
                "{}: {e} (run `entente init` first)",
                path.display()
            ))
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(Error::Config(format!(
                    "{} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Reads the API token.
    pub fn load_token(&self) -> Result<String> {
        let t = std::fs::read_to_string(self.token_path())?;
        Ok(t.trim().to_string())
    }
}

/// Whether a multiaddr names a QUIC transport.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| {
        matches!(
            p,
            libp2p::multiaddr::Protocol::QuicV1 | libp2p::multiaddr::Protocol::Quic
        )
    })
}

/// Refuses a QUIC address on a node with a cluster key (`keyed`): the
/// private network wraps TCP only, so a QUIC connection would bypass it.
/// For the config's addresses and for peers added at run time alike.
pub fn check_transport(keyed: bool, addr: &Multiaddr) -> Result<()> {
    if keyed && is_quic(addr) {
        return Err(Error::Config(format!(
            "{addr}: QUIC cannot carry the cluster key (libp2p's private network runs over TCP only); use TCP addresses or no cluster_key_file"
        )));
    }
    Ok(())
}

/// Reads a cluster key file (refusing one others may read).
pub fn read_cluster_key(path: &Path) -> Result<PreSharedKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cluster key {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::Config(format!(
                "cluster key {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
    }
    text.parse::<PreSharedKey>().map_err(|e| {
        Error::Config(format!(
            "cluster key {}: {e} (expected `/key/swarm/psk/1.0.0/`, `/base16/` and 64 hex digits, one per line)",
            path.display()
        ))
    })
}

/// Writes a new random cluster key to `path` (mode 0600; refuses to replace
/// an existing file).
pub fn new_cluster_key(path: &Path) -> Result<PreSharedKey> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Config(format!("no OS randomness: {e}")))?;
    let key = PreSharedKey::new(bytes);
    write_private(path, key.to_key_file().as_bytes())
        .map_err(|e| Error::Config(format!("cluster key {}: {e}", path.display())))?;
    Ok(key)
}

/// Writes a file only its owner can read (created with mode 0600).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_is_the_default_config_and_round_trips() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn sync_collections_parse_and_round_trip() {
        let c = Config::from_toml("[sync]\ncollections = [\"contacts\", \"addresses\"]\n").unwrap();
        assert_eq!(c.sync.collections, ["contacts", "addresses"]);
        assert_eq!(
            c.sync.pull_interval_ms,
            SyncTuning::default().pull_interval_ms
        );
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        assert!(Config::from_toml("[sync]\ncollections = \"contacts\"\n").is_err());
    }

    #[test]
    fn a_static_peer_without_peer_id_is_refused() {
        let e = Config::from_toml(r#"peers = ["/ip4/127.0.0.1/tcp/1"]"#).unwrap_err();
        assert!(e.to_string().contains("/p2p/"), "{e}");
        assert!(Config::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn quic_addresses_are_refused_with_a_cluster_key() {
        let quic = r#"listen = ["/ip4/0.0.0.0/udp/4001/quic-v1"]"#;
        Config::from_toml(quic).unwrap();
        let keyed = format!("{quic}\ncluster_key_file = \"/k\"");
        let e = Config::from_toml(&keyed).unwrap_err();
        assert!(
            e.to_string().contains("QUIC cannot carry the cluster key"),
            "{e}"
        );
        let peer = r#"cluster_key_file = "/k"
peers = ["/ip4/10.0.0.2/udp/4001/quic-v1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"]"#;
        assert!(Config::from_toml(peer).is_err());
        Config::from_toml("cluster_key_file = \"/k\"").unwrap();
    }

    #[test]
    fn init_makes_private_files_and_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("n"));
        let first = d.init().unwrap();
        assert!(first.created);
        let again = d.init().unwrap();
        assert!(!again.created);
        assert_eq!(first.peer_id, again.peer_id);
        assert_eq!(first.node_id, node_id_for(&first.peer_id));
        assert_eq!(d.load_token().unwrap().len(), TOKEN_BYTES * 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [d.identity_path(), d.token_path()] {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", p.display());
            }
        }
    }
}
