//! The peer layer on libp2p: one [`Behaviour`], the transport, and the
//! ordering of replication frames. It carries bytes; it decides nothing about
//! replication (that is [`crate::sync`], driven by [`crate::runtime`]).
//!
//! ## Transport and security
//!
//! TCP, then Noise (every connection authenticated by the peer's Ed25519 key
//! and encrypted), then Yamux with at most
//! [`Limits::max_streams_per_connection`](crate::config::Limits) streams. The
//! libp2p Yamux wrapper (0.48) exposes no window settings; its receive
//! windows grow on demand from 256 KiB per stream, and a stream's data is
//! bounded by our frame cap below.
//!
//! Who may talk to the node: [`allow_block_list`] with an allow-list of peer
//! ids (the static peers, `allow` in the config and peers added at run time)
//! refuses any other peer once Noise has proved its id, before a single
//! protocol byte is read; the refusal is logged with the peer id. A second
//! list blocks peers (this is how operators and tests cut a partition);
//! blocking or removing a peer closes its connections at once.
//! [`connection_limits`] caps established connections in total and per
//! peer, and incoming handshakes in progress.
//!
//! ## Replication frames: request-response with a sequence number
//!
//! The sync engine is message-oriented and needs, per peer, the messages in
//! the order they were sent (DESIGN, "Transport mapping"). Each engine
//! message to a peer goes as one request-response *request* on
//! [`REPL_PROTOCOL`], answered by a one-byte acknowledgement. A request is a
//! big-endian `u64` sequence number, counted per peer from 0 when the first
//! connection to the peer opens, followed by the engine's frame, capped at
//! [`MAX_FRAME_BYTES`] and bounded by a timeout.
//!
//! Request-response alone does not keep order: every request is a new Yamux
//! stream, read concurrently, and with two connections to one peer requests
//! are spread over both. So the receiver hands frames to the engine through
//! an [`Inbox`] that releases them strictly in sequence order, holding at
//! most [`MAX_OUT_OF_ORDER`] early ones. A gap can only close or break the
//! session: a request that fails (timeout, closed connection, I/O error) on
//! either side makes the runtime close every connection to that peer, and
//! the engine then starts a fresh session (from its persisted checkpoint)
//! when the peer comes back. That is exactly the guarantee the engine
//! assumes: in order, or the session breaks.
//!
//! ## Gossip
//!
//! Gossipsub on the topic `entente/<cluster>/push`, signed messages, strict
//! validation, and `validate_messages()`: nothing is forwarded before the
//! runtime accepted it. Gossip messages are capped at
//! [`Limits::max_gossip_bytes`](crate::config::Limits) (pushes are record
//! ids and heads only).

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, allow_block_list, connection_limits, gossipsub, identify, mdns, noise,
    ping, quic, request_response, tcp, yamux,
};

use libp2p::PeerId;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::pnet::PnetConfig;

use crate::config::{Config, read_cluster_key};
use crate::error::{Error, Result};
use crate::sync::wire::MAX_MESSAGE_BYTES;

/// The replication protocol (engine frames with a sequence number).
pub const REPL_PROTOCOL: StreamProtocol = StreamProtocol::new("/entente/repl/1");
/// Bytes of the per-peer sequence number in front of each frame.
pub const SEQ_BYTES: usize = 8;
/// Largest replication request: the engine's frame cap plus the sequence.
pub const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + SEQ_BYTES;
/// Frames from one peer held while an earlier one is still being read.
pub const MAX_OUT_OF_ORDER: usize = 32;
/// The acknowledgement byte answering each frame.
const ACK: u8 = 0xA5;
/// Identify protocol version string.
const IDENTIFY_PROTOCOL: &str = "/entente/id/1";

/// Everything the node speaks, composed.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Peers that may connect (everyone else is refused after Noise).
    pub allowed: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    /// Peers cut off by an operator (or a test's partition).
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Connection caps.
    pub limits: connection_limits::Behaviour,
    /// Exchange of listen addresses and agent versions.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// Push gossip.
    pub gossipsub: gossipsub::Behaviour,
    /// Ordered replication frames.
    pub repl: request_response::Behaviour<FrameCodec>,
    /// LAN discovery, when enabled.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("allowed", &self.allowed.allowed_peers().len())
            .field("blocked", &self.blocked.blocked_peers().len())
            .finish_non_exhaustive()
    }
}

/// Reads and writes replication frames: a request is the whole stream up to
/// [`MAX_FRAME_BYTES`]; a response is the one byte [`ACK`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(MAX_FRAME_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .await?;
        if buf.len() > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame over {MAX_FRAME_BYTES} bytes"),
            ));
        }
        if buf.len() <= SEQ_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame without a sequence number and message",
            ));
        }
        Ok(buf)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        if b[0] != ACK {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad ack"));
        }
        Ok(())
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, _: ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&[ACK]).await
    }
}

/// Puts a sequence number in front of a frame.
pub fn seal(seq: u64, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEQ_BYTES + frame.len());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// Releases one peer's frames in sequence order.
#[derive(Debug, Default)]
pub struct Inbox {
    next: u64,
    early: BTreeMap<u64, Vec<u8>>,
}

impl Inbox {
    /// A request as read from the wire (sequence, frame): returns the frames
    /// now deliverable, in order. Errors (a replayed sequence, too many early
    /// frames) mean the peer broke the stream: close its connections.
    pub fn accept(&mut self, request: Vec<u8>) -> std::result::Result<Vec<Vec<u8>>, String> {
        if request.len() <= SEQ_BYTES {
            return Err("frame without a message".into());
        }
        let seq = u64::from_be_bytes(request[..SEQ_BYTES].try_into().expect("8 bytes"));
        if seq < self.next || self.early.contains_key(&seq) {
            return Err(format!("sequence {seq} seen already"));
        }
        if seq > self.next + MAX_OUT_OF_ORDER as u64 || self.early.len() >= MAX_OUT_OF_ORDER {
            return Err(format!(
                "sequence {seq} too far ahead of {} (at most {MAX_OUT_OF_ORDER} held)",
                self.next
            ));
        }
        self.early.insert(seq, request[SEQ_BYTES..].to_vec());
        let mut ready = Vec::new();
        while let Some(frame) = self.early.remove(&self.next) {
            ready.push(frame);
            self.next += 1;
        }
        Ok(ready)
    }
}

/// The gossip topic of a cluster.
pub fn topic(cluster: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("entente/{cluster}/push"))
}

/// Noise and Yamux over `base`, as libp2p's own TCP builder stacks them.
fn authenticated<T>(
    base: T,
    key: &Keypair,
    yamux_config: yamux::Config,
) -> std::result::Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    Ok(base
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux_config)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// Builds the swarm: TCP (inside the cluster key's private network when the
/// config names one) + Noise + Yamux, and QUIC when there is no cluster key;
/// the behaviour; the allow-list filled from the config.
pub fn build_swarm(key: Keypair, config: &Config) -> Result<Swarm<Behaviour>> {
    let psk = config
        .cluster_key_file
        .as_deref()
        .map(read_cluster_key)
        .transpose()?;
    if let Some(psk) = &psk {
        tracing::info!(fingerprint = %psk.fingerprint(), "private network: connections need the cluster key");
    }
    let limits = &config.limits;
    let quic_streams = u32::try_from(limits.max_streams_per_connection).unwrap_or(u32::MAX);
    let mut yamux_config = yamux::Config::default();
    yamux_config.set_max_num_streams(limits.max_streams_per_connection);
    let net_err = |e: &dyn std::fmt::Display| Error::Network(e.to_string());

    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(limits.max_gossip_bytes)
        .heartbeat_interval(Duration::from_millis(500))
        .build()
        .map_err(|e| net_err(&e))?;

    let conn_limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(limits.max_connections))
        .with_max_established_per_peer(Some(limits.max_connections_per_peer))
        .with_max_pending_incoming(Some(limits.max_pending_incoming));

    let repl_config = request_response::Config::default()
        .with_request_timeout(Duration::from_secs(limits.request_timeout_secs))
        .with_max_concurrent_streams(limits.max_streams_per_connection);

    let mdns_on = config.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(move |key| {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            match psk {
                // The private network's handshake runs first, on the raw
                // socket: without the key nothing else can be read. QUIC
                // cannot carry it (`Config::validate` refuses QUIC
                // addresses with a key), so a keyed node speaks TCP only.
                Some(psk) => authenticated(
                    tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)),
                    key,
                    yamux_config,
                ),
                None => {
                    let mut quic_config = quic::Config::new(key);
                    quic_config.max_concurrent_stream_limit = quic_streams;
                    let quic = quic::tokio::Transport::new(quic_config)
                        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
                    Ok(authenticated(tcp, key, yamux_config)?
                        .or_transport(quic)
                        .map(|either, _| either.into_inner())
                        .boxed())
                }
            }
        })
        .map_err(|e| net_err(&e))?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                allowed: Default::default(),
                blocked: Default::default(),
                limits: connection_limits::Behaviour::new(conn_limits),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                gossipsub,
                repl: request_response::Behaviour::with_codec(
                    FrameCodec,
                    [(REPL_PROTOCOL, request_response::ProtocolSupport::Full)],
                    repl_config,
                ),
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| net_err(&e))?
        // Allow-listed peers stay connected while idle: replication is
        // sparse, and a closed connection costs a new handshake and session.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();

    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic(&config.cluster))
        .map_err(|e| net_err(&e))?;
    for addr in &config.peers {
        let peer = crate::config::peer_of(addr)?;
        swarm.behaviour_mut().allowed.allow_peer(peer);
    }
    for peer in &config.allow {
        swarm.behaviour_mut().allowed.allow_peer(*peer);
    }
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_releases_in_order_and_refuses_replays() {
        let mut inbox = Inbox::default();
        assert_eq!(inbox.accept(seal(1, b"b")).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(inbox.accept(seal(2, b"c")).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            inbox.accept(seal(0, b"a")).unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(inbox.accept(seal(1, b"x")).is_err());
        assert!(
            inbox
                .accept(seal(3 + MAX_OUT_OF_ORDER as u64 + 1, b"x"))
                .is_err()
        );
        assert!(inbox.accept(vec![0; SEQ_BYTES]).is_err());
        assert_eq!(inbox.accept(seal(3, b"d")).unwrap(), vec![b"d".to_vec()]);
    }
}
