//! The `entente` CLI end to end against a running `entente api` process:
//! tables, `--json` shapes, exit codes, collisions, the feed, import and
//! export.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use entente_model::{NodeId, Schema};
use entente_node::{Store, StoreOptions, SystemClock};
use entente_tests::entente_bin;
use serde_json::{Value as Json, json};

/// Exit codes the README documents.
const NOT_FOUND: i32 = 3;
const BAD_INPUT: i32 = 2;
const DUPLICATE: i32 = 4;
const UNREACHABLE: i32 = 5;
const UNAUTHORIZED: i32 = 6;
const REFUSED: i32 = 7;

/// A running `entente api`, killed when dropped.
struct Node {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(dir: &Path, extra: &[&str]) -> Node {
        let mut child = Command::new(entente_bin())
            .args(["api", "--data-dir"])
            .arg(dir)
            .args(["--api", "127.0.0.1:0"])
            .args(extra)
            .env_remove("ENTENTE_NODE")
            .env_remove("ENTENTE_TOKEN")
            .env_remove("ENTENTE_DATA_DIR")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("entente api starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line `{line}`"))
            .to_string();
        Node {
            child,
            url,
            dir: dir.to_path_buf(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(entente_bin());
        c.args(["--node", &self.url])
            .args(args)
            .env_remove("ENTENTE_NODE")
            .env_remove("ENTENTE_TOKEN")
            .env_remove("ENTENTE_DATA_DIR");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Json {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed non-JSON ({e}): {}", text(&out)))
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn assert_record_shape(r: &Json) {
    for key in ["id", "collection", "fields", "deleted", "heads"] {
        assert!(r.get(key).is_some(), "record lacks `{key}`: {r}");
    }
}

#[test]
fn records_round_trip_with_json_shapes_tables_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);

    let w = node.json(&[
        "put",
        "contacts",
        "email=john@example.org",
        "first_name=John",
        "do_not_email=yes",
    ]);
    let rec = &w["record"];
    assert_record_shape(rec);
    assert_eq!(rec["fields"]["do_not_email"], true);
    let id = rec["id"].as_str().unwrap().to_string();

    let got = node.json(&["get", &id]);
    assert_record_shape(&got);
    assert_eq!(got["fields"]["first_name"], "John");
    let table = node.run(&["get", &id]);
    assert!(table.status.success());
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(
        t.contains("first_name") && t.contains("John") && t.contains(&id),
        "{t}"
    );

    // Update through `put COLLECTION ID`, based on the heads read.
    let heads = got["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(",");
    node.json(&["put", "contacts", &id, "city=Bern"]);
    let based = node.json(&["put", "contacts", &id, "city=Basel", "--base", &heads]);
    assert_eq!(based["concurrent"][0]["field"], "city");
    assert_eq!(based["concurrent"][0]["existing_value"], "Bern");
    assert_eq!(based["concurrent"][0]["new_value"], "Basel");

    // Create with a chosen id.
    let chosen = "0190a5d2-0000-7000-8000-0000000000aa";
    let w = node.json(&["put", "contacts", chosen, "email=jane@example.org"]);
    assert_eq!(w["record"]["id"], chosen);

    let dup = node.run(&["put", "contacts", "email=JOHN@example.org"]);
    assert_eq!(code(&dup), DUPLICATE, "{}", text(&dup));
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.contains("DUPLICATE_EMAIL") && err.contains(&id),
        "{err}"
    );

    let missing = node.run(&["get", "0190a5d2-0000-7000-8000-0000000000ff"]);
    assert_eq!(code(&missing), NOT_FOUND, "{}", text(&missing));
    let bad_field = node.run(&["put", "contacts", "shoe_size=44"]);
    assert_eq!(code(&bad_field), BAD_INPUT, "{}", text(&bad_field));
    assert!(String::from_utf8_lossy(&bad_field.stderr).contains("UNKNOWN_FIELD"));
    let bad_value = node.run(&["put", "contacts", "do_not_email=maybe"]);
    assert_eq!(code(&bad_value), BAD_INPUT, "{}", text(&bad_value));
    let bad_id = node.run(&["get", "nope"]);
    assert_eq!(code(&bad_id), BAD_INPUT, "{}", text(&bad_id));

    let rm = node.json(&["rm", &id]);
    assert_eq!(rm["record"]["deleted"], true);
    let edit_deleted = node.run(&["put", "contacts", &id, "city=Bern"]);
    assert_eq!(code(&edit_deleted), REFUSED, "{}", text(&edit_deleted));
    let ls = node.json(&["ls", "contacts"]);
    assert_eq!(ls["records"].as_array().unwrap().len(), 1);
    assert_record_shape(&ls["records"][0]);
    let ls_all = node.json(&["ls", "contacts", "--deleted"]);
    assert_eq!(ls_all["records"].as_array().unwrap().len(), 2);
    let filtered = node.json(&["ls", "contacts", "email=jane@example.org"]);
    assert_eq!(filtered["records"][0]["id"], chosen);
    node.json(&["restore", &id]);
    let h = node.json(&["history", &id]);
    let ops: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["op"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ops.len(), 5, "{h}");
    let h_table = node.run(&["history", &id]);
    assert!(String::from_utf8_lossy(&h_table.stdout).contains("WHEN"));

    let status = node.json(&["status"]);
    assert_eq!(status["live_records"], 2);
    assert_eq!(status["networked"], false);
    let status_table = node.run(&["status"]);
    assert!(String::from_utf8_lossy(&status_table.stdout).contains("feed seq"));

    let peers = node.json(&["peers"]);
    assert_eq!(peers["peers"], json!([]));
    let add = node.run(&["peers", "add", "/ip4/127.0.0.1/tcp/1"]);
    assert_eq!(code(&add), REFUSED, "{}", text(&add));
    assert!(String::from_utf8_lossy(&add.stderr).contains("NO_NETWORK"));
    let verify = node.run(&[
        "verify",
        "--peer",
        "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
    ]);
    assert_eq!(code(&verify), REFUSED, "{}", text(&verify));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("NO_NETWORK"));

    // The feed: every record once, since a sequence.
    let feed = node.run(&["--json", "changes"]);
    assert!(feed.status.success());
    let lines: Vec<Json> = String::from_utf8_lossy(&feed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for key in ["seq", "collection", "id", "deleted", "fields"] {
        assert!(lines[0].get(key).is_some(), "{key}");
    }
    let first_seq = lines[0]["seq"].as_u64().unwrap().to_string();
    let since = node.run(&["--json", "changes", "--since", &first_seq]);
    assert_eq!(String::from_utf8_lossy(&since.stdout).lines().count(), 1);

    drop(node);
    let down = Command::new(entente_bin())
        .args(["--node", "http://127.0.0.1:1", "status"])
        .env_remove("ENTENTE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(code(&down), UNREACHABLE, "{}", text(&down));
}

#[test]
fn a_required_token_comes_from_the_environment_or_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--require-token"]);
    let none = node.run(&["status"]);
    assert_eq!(code(&none), UNAUTHORIZED, "{}", text(&none));
    let wrong = node
        .cmd(&["status"])
        .env("ENTENTE_TOKEN", "nope")
        .output()
        .unwrap();
    assert_eq!(code(&wrong), UNAUTHORIZED, "{}", text(&wrong));
    let token = std::fs::read_to_string(dir.path().join("api-token")).unwrap();
    let env = node
        .cmd(&["status"])
        .env("ENTENTE_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(env.status.success(), "{}", text(&env));
    let from_dir = node
        .cmd(&["--data-dir"])
        .arg(&node.dir)
        .arg("status")
        .output()
        .unwrap();
    assert!(from_dir.status.success(), "{}", text(&from_dir));
}

/// A data dir holding an open duplicate collision: a second node's contact
/// with the same e-mail arrived as remote changes.
fn dir_with_collision(dir: &Path) -> (String, String) {
    let schema = Arc::new(Schema::default_crm());
    let mut other = Store::memory(schema.clone(), NodeId([2; 16]), Arc::new(SystemClock));
    let fields = |city: &str| {
        json!({ "email": "dup@example.org", "city": city, "first_name": "Ann" })
            .as_object()
            .unwrap()
            .clone()
    };
    let theirs = other
        .create("contacts", None, &fields("Lausanne"), false)
        .unwrap()
        .record
        .id;
    let changes = other.changes_for(&theirs, &[]).unwrap();
    let mut s = Store::open(
        dir,
        schema,
        NodeId([1; 16]),
        Arc::new(SystemClock),
        StoreOptions::default(),
    )
    .unwrap();
    let ours = s
        .create("contacts", None, &fields("Geneva"), false)
        .unwrap()
        .record
        .id;
    s.apply_remote(vec![(theirs.clone(), changes)]).unwrap();
    (ours.to_string(), theirs.to_string())
}

#[test]
fn collisions_are_listed_shown_side_by_side_and_resolved_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = dir_with_collision(dir.path());
    let node = Node::start(dir.path(), &[]);
    let list = node.json(&["collisions"]);
    let cs = list["collisions"].as_array().unwrap();
    assert_eq!(cs.len(), 1, "{list}");
    for key in ["id", "kind", "status", "collection", "records", "sides"] {
        assert!(cs[0].get(key).is_some(), "collision lacks `{key}`");
    }
    assert_eq!(cs[0]["kind"], "duplicate");
    let cid = cs[0]["id"].as_str().unwrap().to_string();
    let by_kind = node.json(&["collisions", "--kind", "update_delete"]);
    assert_eq!(by_kind["collisions"], json!([]));

    let show = node.run(&["collisions", "show", &cid]);
    assert!(show.status.success(), "{}", text(&show));
    let t = String::from_utf8_lossy(&show.stdout);
    let city = t
        .lines()
        .find(|l| l.contains("city"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        city.starts_with('*') && city.contains("Geneva") && city.contains("Lausanne"),
        "{t}"
    );
    let name = t.lines().find(|l| l.contains("first_name")).unwrap();
    assert!(!name.starts_with('*'), "{t}");

    let unknown = node.run(&["collisions", "show", &"ab".repeat(16)]);
    assert_eq!(code(&unknown), NOT_FOUND);
    let wrong = node.run(&["collisions", "resolve", &cid, "--confirm-delete"]);
    assert_eq!(code(&wrong), BAD_INPUT, "{}", text(&wrong));

    let done = node.json(&[
        "collisions",
        "resolve",
        &cid,
        "--merge-into",
        &ours,
        "--keep",
        &format!("city={theirs}"),
    ]);
    assert_eq!(done["collision"]["status"]["state"], "resolved");
    assert_eq!(node.json(&["collisions"])["collisions"], json!([]));
    assert_eq!(
        node.json(&["collisions", "--all"])["collisions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let survivor = node.json(&["get", &theirs]);
    assert_eq!(survivor["id"], ours);
    assert_eq!(survivor["fields"]["city"], "Lausanne");
}

#[test]
fn an_import_of_100000_lines_with_10_bad_ones_lands_exactly_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let file = dir.path().join("contacts.jsonl");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    let total = 100_000;
    let bad: Vec<usize> = (0..10).map(|k| 3 + k * 9_973).collect();
    for i in 0..total {
        let line = if bad.contains(&i) {
            match i % 4 {
                0 => "{\"collection\": \"contacts\", \"fields\": {".to_string(),
                1 => json!({ "collection": "clients", "fields": {} }).to_string(),
                2 => json!({ "collection": "contacts", "fields": { "shoe_size": 1 } }).to_string(),
                _ => json!({ "collection": "contacts", "fields": { "do_not_email": "maybe" } })
                    .to_string(),
            }
        } else {
            json!({
                "collection": "contacts",
                "fields": {
                    "first_name": format!("First{i}"),
                    "email": format!("person{i}@example.org"),
                    "member_key": format!("MK-{i:08}"),
                    "city": "Zurich",
                }
            })
            .to_string()
        };
        writeln!(w, "{line}").unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let out = node.run(&["--json", "import", file.to_str().unwrap()]);
    assert_eq!(code(&out), BAD_INPUT, "{}", text(&out));
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["lines"], total as u64);
    assert_eq!(report["created"], (total - 10) as u64, "{report}");
    assert_eq!(report["failed"], 10);
    let lines: Vec<u64> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, bad.iter().map(|i| *i as u64 + 1).collect::<Vec<_>>());
    let status = node.json(&["status"]);
    assert_eq!(status["live_records"], (total - 10) as u64);
    assert_eq!(status["records"], (total - 10) as u64);

    // Export one collection to a file: every record, one line each.
    let exported = dir.path().join("export.jsonl");
    let out = node.run(&[
        "export",
        "--collection",
        "contacts",
        "--output",
        exported.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let text_out = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(text_out.lines().count(), total - 10);
    let first: Json = serde_json::from_str(text_out.lines().next().unwrap()).unwrap();
    assert_record_shape(&first);
}
