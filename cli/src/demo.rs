//! `entente demo`: three sites on loopback in one process — real nodes (libp2p,
//! RocksDB in data dirs of their own, the HTTP API) — walking through the
//! story of the background documents, step by step:
//!
//! 1. the office creates John Smith and Bob Brown; both reach every site;
//! 2. cut off from each other, John changes his e-mail online while the
//!    office changes his street → merged field by field, no collision;
//! 3. cut off again, the office and the branch each add Mary Jones with the
//!    same e-mail → one `duplicate` collision, the same id on every site;
//! 4. cut off again, the office deletes Bob while the online site edits him
//!    → one `update_delete` collision, the same id on every site.
//!
//! A partition is cut the way an operator would: each site blocks the peer
//! ids on the other side (connections close at once) and unblocks them to
//! heal. After each heal the demo waits until the three sites hold the same
//! records (ids and heads) and the same collisions, and says how long that
//! took. Then it prints the commands to inspect and settle the collisions
//! and leaves the sites running until Ctrl-C (`--once` exits instead).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use entente_model::{Collision, CollisionKind, RecordId};
use entente_node::api::node::RunningApi;
use entente_node::config::{Config, DataDir};
use entente_node::libp2p::{Multiaddr, PeerId};
use entente_node::runtime::{self, NodeHandle, RunningNode};
use entente_node::{CollisionFilter, api};
use serde_json::{Map, Value, json};

/// `entente demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Exit after the walkthrough instead of leaving the sites running.
    #[arg(long)]
    pub once: bool,
    /// Keep the three data dirs under DIR (default: a temporary dir,
    /// removed on exit).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// API port of the first site; the others take the next two. A port in
    /// use (or 0) is replaced by a free one.
    #[arg(long, default_value_t = 7070)]
    pub api_port: u16,
    /// Longest wait for the sites to converge after a heal (seconds).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

const SITES: [&str; 3] = ["office", "online", "branch"];
const OFFICE: usize = 0;
const ONLINE: usize = 1;
const BRANCH: usize = 2;

struct Site {
    name: &'static str,
    node: RunningNode,
    api: RunningApi,
    peer: PeerId,
    addr: Multiaddr,
}

impl Site {
    fn h(&self) -> &NodeHandle {
        &self.node.handle
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    let (root, _tmp) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("entente-demo-")
                .tempdir()
                .context("making a temporary dir")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(demo(args, root))
}

async fn demo(args: DemoArgs, root: PathBuf) -> Result<()> {
    let patience = Duration::from_secs(args.timeout);
    println!(
        "Entente demo: three sites on 127.0.0.1, each a real node (libp2p, RocksDB, HTTP API)"
    );
    let mut sites = Vec::new();
    for (i, name) in SITES.iter().enumerate() {
        let port = if args.api_port == 0 {
            0
        } else {
            args.api_port.saturating_add(i as u16)
        };
        sites.push(start_site(&root.join(name), name, port).await?);
    }
    let result = walkthrough(&sites, patience).await;
    let outcome = match result {
        Ok(story) => {
            print_next_steps(&sites, &story);
            if args.once {
                Ok(())
            } else {
                println!();
                println!("The sites keep running; Ctrl-C stops them.");
                tokio::signal::ctrl_c()
                    .await
                    .context("waiting for Ctrl-C")?;
                println!("stopping the sites");
                Ok(())
            }
        }
        Err(e) => Err(e),
    };
    for s in sites {
        let _ = s.api.stop().await;
        s.node.stop().await?;
    }
    if let Some(d) = &args.dir {
        println!("data dirs kept in {}", d.display());
    }
    outcome
}

async fn start_site(dir: &std::path::Path, name: &'static str, port: u16) -> Result<Site> {
    let data = DataDir::new(dir);
    data.init()
        .with_context(|| format!("initializing {}", dir.display()))?;
    let mut config = Config {
        cluster: "demo".into(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        ..Config::default()
    };
    // Short anti-entropy so a heal shows within a second.
    config.sync.pull_interval_ms = 500;
    config.sync.redial_min_ms = 100;
    config.sync.redial_max_ms = 1_000;
    let node = runtime::start(&data, config).await?;
    let h = node.handle.clone();
    let wanted = SocketAddr::from(([127, 0, 0, 1], port));
    let api = match api::node::start(&h, data.root(), wanted, false).await {
        Ok(a) => a,
        Err(_) if port != 0 => {
            api::node::start(
                &h,
                data.root(),
                SocketAddr::from(([127, 0, 0, 1], 0)),
                false,
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    let addr = wait_for("a listen address", Duration::from_secs(10), || {
        let h = h.clone();
        async move {
            let st = h.status().await?;
            Ok(st
                .listen_addrs
                .first()
                .and_then(|a| a.parse::<Multiaddr>().ok()))
        }
    })
    .await?;
    let peer = h.peer_id();
    println!("  {name:<7} peer {peer}  api http://{}", api.addr);
    Ok(Site {
        name,
        node,
        api,
        peer,
        addr,
    })
}

/// What the walkthrough made, for the closing hints.
struct Story {
    mary: [RecordId; 2],
    bob: RecordId,
    duplicate: Collision,
    update_delete: Collision,
}

async fn walkthrough(sites: &[Site], patience: Duration) -> Result<Story> {
    // Full mesh: the lower site dials, the higher one allows.
    for i in 0..sites.len() {
        for j in i + 1..sites.len() {
            let addr = sites[j].addr.clone();
            sites[i].h().add_peer(sites[j].peer, Some(addr)).await?;
            sites[j].h().add_peer(sites[i].peer, None).await?;
        }
    }
    let t = Instant::now();
    wait_connected(sites, patience).await?;
    println!(
        "  connected in a full mesh ({:.1} s)",
        t.elapsed().as_secs_f64()
    );

    step(1, "the office creates two contacts");
    let office = sites[OFFICE].h();
    let john = create(
        office,
        json!({"first_name": "John", "last_name": "Smith", "email": "john.smith@example.com",
               "street": "1 Old Road", "city": "Springfield"}),
    )
    .await?;
    let bob = create(
        office,
        json!({"first_name": "Bob", "last_name": "Brown", "email": "bob.brown@example.com",
               "phone": "+1 555 0100"}),
    )
    .await?;
    println!("    office: John Smith {john}, Bob Brown {bob}");
    converge(sites, patience).await?;

    step(
        2,
        "cut off: John changes his e-mail online while the office changes his street",
    );
    partition(sites, &[OFFICE], &[ONLINE, BRANCH]).await?;
    update(
        sites[ONLINE].h(),
        &john,
        json!({"email": "john@smith.example"}),
    )
    .await?;
    println!("    online: John's e-mail  -> john@smith.example");
    update(office, &john, json!({"street": "2 New Street"})).await?;
    println!("    office: John's street  -> 2 New Street");
    heal(sites).await?;
    converge(sites, patience).await?;
    let merged = get(sites[BRANCH].h(), &john).await?;
    println!(
        "    branch sees John with e-mail {} and street {}: merged field by field",
        merged["email"], merged["street"]
    );
    if merged["email"] != json!("john@smith.example") || merged["street"] != json!("2 New Street") {
        bail!("the concurrent edits of John were not both kept: {merged:?}");
    }
    let open = open_collisions(sites[OFFICE].h()).await?;
    if !open.is_empty() {
        bail!("edits of different fields raised collisions: {open:?}");
    }
    println!("    open collisions: none");

    step(
        3,
        "cut off: the office and the branch both add Mary Jones with the same e-mail",
    );
    partition(sites, &[OFFICE, ONLINE], &[BRANCH]).await?;
    let mary_office = create(
        office,
        json!({"first_name": "Mary", "last_name": "Jones", "email": "mary.jones@example.com"}),
    )
    .await?;
    println!("    office: Mary Jones {mary_office} (mary.jones@example.com)");
    let mary_branch = create(
        sites[BRANCH].h(),
        json!({"first_name": "Mary", "last_name": "Jones", "email": " Mary.Jones@Example.com"}),
    )
    .await?;
    println!("    branch: Mary Jones {mary_branch} (\" Mary.Jones@Example.com\")");
    heal(sites).await?;
    converge(sites, patience).await?;
    let duplicate = the_collision(sites, CollisionKind::Duplicate).await?;
    println!(
        "    every site reports duplicate {} on email = {}",
        duplicate.id,
        duplicate.value.as_deref().unwrap_or("?")
    );

    step(
        4,
        "cut off: the office deletes Bob while the online site edits his phone",
    );
    partition(sites, &[OFFICE], &[ONLINE, BRANCH]).await?;
    office
        .delete(bob.clone())
        .await
        .context("deleting Bob at the office")?;
    println!("    office: Bob Brown deleted");
    update(sites[ONLINE].h(), &bob, json!({"phone": "+1 555 0199"})).await?;
    println!("    online: Bob's phone    -> +1 555 0199");
    heal(sites).await?;
    converge(sites, patience).await?;
    let update_delete = the_collision(sites, CollisionKind::UpdateDelete).await?;
    println!(
        "    every site reports update_delete {} on Bob",
        update_delete.id
    );
    Ok(Story {
        mary: [mary_office, mary_branch],
        bob,
        duplicate,
        update_delete,
    })
}

fn step(n: usize, what: &str) {
    println!();
    println!("[{n}] {what}");
}

fn print_next_steps(sites: &[Site], story: &Story) {
    let node = |i: usize| format!("entente --node http://{}", sites[i].api.addr);
    println!();
    println!("Inspect and settle the collisions from any site, for example:");
    println!("  {} collisions", node(OFFICE));
    println!("  {} collisions show {}", node(OFFICE), story.duplicate.id);
    println!(
        "  {} collisions resolve {} --merge-into {}",
        node(OFFICE),
        story.duplicate.id,
        story.mary[0]
    );
    println!(
        "  {} collisions show {}",
        node(ONLINE),
        story.update_delete.id
    );
    println!(
        "  {} collisions resolve {} --restore      (or --confirm-delete)",
        node(ONLINE),
        story.update_delete.id
    );
    println!("  {} get {}", node(BRANCH), story.bob);
    println!("  {} collisions --all", node(BRANCH));
    println!("A resolution made at one site closes the collision on all three.");
}

async fn create(node: &NodeHandle, fields: Value) -> Result<RecordId> {
    let fields = object(fields);
    let w = node
        .create("contacts", None, fields, false)
        .await
        .context("creating a contact")?;
    Ok(w.record.id)
}

async fn update(node: &NodeHandle, id: &RecordId, fields: Value) -> Result<()> {
    node.update(id.clone(), object(fields), None, false)
        .await
        .with_context(|| format!("updating {id}"))?;
    Ok(())
}

async fn get(node: &NodeHandle, id: &RecordId) -> Result<Map<String, Value>> {
    Ok(node
        .get(id.clone())
        .await?
        .ok_or_else(|| anyhow!("{id} is missing"))?
        .fields)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn open_collisions(node: &NodeHandle) -> Result<Vec<Collision>> {
    Ok(node.collisions(CollisionFilter::default()).await?)
}

/// The one open collision of `kind`, which every site must report alike.
async fn the_collision(sites: &[Site], kind: CollisionKind) -> Result<Collision> {
    let mut found: Option<Collision> = None;
    for s in sites {
        let of_kind: Vec<Collision> = open_collisions(s.h())
            .await?
            .into_iter()
            .filter(|c| c.kind == kind)
            .collect();
        let [c] = &of_kind[..] else {
            bail!(
                "{} reports {} open {} collisions, expected one",
                s.name,
                of_kind.len(),
                kind.as_str()
            );
        };
        match &found {
            None => found = Some(c.clone()),
            Some(f) if f.id == c.id => {}
            Some(f) => bail!(
                "{} names the collision {}, another site {}",
                s.name,
                c.id,
                f.id
            ),
        }
    }
    found.ok_or_else(|| anyhow!("no sites"))
}

/// Every site blocks the peers on the other side.
async fn partition(sites: &[Site], left: &[usize], right: &[usize]) -> Result<()> {
    let names = |g: &[usize]| {
        g.iter()
            .map(|&i| sites[i].name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("    (link cut: {} | {})", names(left), names(right));
    for &a in left {
        for &b in right {
            sites[a].h().block_peer(sites[b].peer).await?;
            sites[b].h().block_peer(sites[a].peer).await?;
        }
    }
    // Wait until the connections across the cut are gone, so the writes
    // that follow are really concurrent.
    wait_for("the partition", Duration::from_secs(10), || async {
        for &a in left {
            let peers = sites[a].h().peers().await?;
            for &b in right {
                let id = sites[b].peer.to_string();
                if peers.iter().any(|p| p.peer_id == id && p.connected) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(()))
    })
    .await
}

/// Every site unblocks every peer; the dialing side redials at once.
async fn heal(sites: &[Site]) -> Result<()> {
    println!("    (link restored)");
    for a in sites {
        for b in sites {
            if a.peer != b.peer {
                a.h().unblock_peer(b.peer).await?;
            }
        }
    }
    Ok(())
}

async fn wait_connected(sites: &[Site], patience: Duration) -> Result<()> {
    wait_for("the sites to connect", patience, || async {
        for s in sites {
            let syncing = s.h().peers().await?.iter().filter(|p| p.syncing).count();
            if syncing < sites.len() - 1 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// What a site holds: every record's heads and every collision's id and
/// status.
async fn fingerprint(node: &NodeHandle) -> Result<(BTreeMap<RecordId, Vec<String>>, Vec<String>)> {
    node.read(|s| {
        let records = s
            .changes_since(0, usize::MAX)?
            .into_iter()
            .map(|e| {
                let mut heads = e.heads;
                heads.sort();
                (e.id, heads)
            })
            .collect();
        let collisions = s
            .collisions(&CollisionFilter {
                include_resolved: true,
                ..Default::default()
            })?
            .into_iter()
            .map(|c| format!("{} {}", c.id, c.is_open()))
            .collect();
        Ok((records, collisions))
    })
    .await
    .map_err(Into::into)
}

async fn converge(sites: &[Site], patience: Duration) -> Result<()> {
    let t = Instant::now();
    wait_for("the sites to converge", patience, || async {
        let first = fingerprint(sites[0].h()).await?;
        for s in &sites[1..] {
            if fingerprint(s.h()).await? != first {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    println!(
        "    all three sites hold the same records and collisions ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polls `check` every 50 ms until it yields a value, for at most `patience`.
async fn wait_for<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up waiting for {what} after {} s", patience.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
