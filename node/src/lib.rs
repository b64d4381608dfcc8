//! # entente-node
//!
//! The Entente node. Its parts, from the bottom up:
//!
//! - [`store`]: records as Automerge documents in RocksDB (snapshot plus
//!   appended change chunks, compacted past a threshold), the unique-value and
//!   reference indexes, the consolidated changes feed, collisions, pending
//!   out-of-order changes — every applied change set one atomic, durable
//!   batch. A bounded cache keeps the hot documents loaded.
//! - [`sync`]: replication as a sans-I/O state machine (handshake, pull of
//!   each peer's feed from a checkpoint, batched fetch of what differs, push
//!   gossip), driven by the network runtime and by `entente-sim` alike.
//! - [`net`]: the peer layer on libp2p (Noise, Yamux, allow-list, gossip
//!   for pushes, ordered request-response frames for sessions).
//! - [`runtime`]: the tokio event loop that wires store, engine and swarm,
//!   and the [`NodeHandle`] that drives a running node.
//! - [`config`]: the TOML config and the data dir (identity, token, store).
//! - [`api`]: the HTTP JSON API (axum) over the store, with hooks through
//!   which the running node adds what only it knows (peers, network metrics).
//! - [`clock`]: time and id minting come from outside, so the simulator can
//!   drive the same code deterministically.
//!
//! The local write path (create, update — optionally based on older heads —,
//! delete, restore, resolve) and the remote path (`apply_remote`, raw
//! Automerge changes from a peer) both end in the store's one `finish` step,
//! so indexes, feed and collisions can never disagree with the documents.

pub mod api;
pub mod clock;
pub mod config;
pub mod error;
pub mod net;
pub mod runtime;
pub mod store;
pub mod sync;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, DataDir};
pub use error::{Error, Result};
pub use libp2p;
pub use runtime::{NodeHandle, NodeStatus, PeerInfo, RunningNode};
pub use store::{
    ApplyReport, CollisionFilter, FeedEntry, NewRecord, Page, QuarantineEntry, RecordView, Store,
    StoreOptions, StoreStats, WriteResult,
};
