//! `GET /quarantine` lists what the store quarantined.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use entente_model::{NodeId, Schema};
use entente_node::api::{self, ApiConfig, ApiState, StandaloneHooks};
use entente_node::{ManualClock, Store};
use serde_json::{Value, json};
use tower::ServiceExt;

const HOST: &str = "127.0.0.1:7070";

#[tokio::test]
async fn quarantined_inputs_are_listed() {
    let schema = Arc::new(Schema::default_crm());
    let mut store = Store::memory(
        schema.clone(),
        NodeId([1; 16]),
        Arc::new(ManualClock::new(1_700_000_000_000, 1)),
    );
    let mut peer = Store::memory(
        schema,
        NodeId([2; 16]),
        Arc::new(ManualClock::new(1_700_000_000_000, 2)),
    );
    let f = json!({"email": "a@x.org"});
    let id = peer
        .create("contacts", None, f.as_object().unwrap(), false)
        .unwrap()
        .record
        .id;
    let mut changes = peer.changes_for(&id, &[]).unwrap();
    changes[0][30] ^= 0x55; // the checksum no longer matches
    let r = store
        .apply_remote_from(Some(NodeId([2; 16])), vec![(id.clone(), changes)])
        .unwrap();
    assert_eq!(r.rejected.len(), 1);

    let config = ApiConfig::for_addr(HOST.parse().unwrap(), None, false).unwrap();
    let state = ApiState::new(store, Arc::new(StandaloneHooks), config);
    let app = api::router(state);
    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/quarantine")
                .header("host", HOST)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let list = v["quarantine"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["record"], id.to_string());
    assert_eq!(list[0]["peer"], NodeId([2; 16]).to_string());
    assert!(
        list[0]["reason"].as_str().unwrap().contains("checksum"),
        "{v}"
    );

    // Releasing it removes the entry; a second release finds none; a bad
    // id is refused.
    let call = |method: &str, uri: String| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", HOST)
            .body(Body::empty())
            .unwrap()
    };
    let released = app
        .clone()
        .oneshot(call("DELETE", format!("/quarantine/{id}")))
        .await
        .unwrap();
    assert_eq!(released.status(), StatusCode::OK);
    let body = axum::body::to_bytes(released.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["released"], 1, "{v}");
    let again = app
        .clone()
        .oneshot(call("DELETE", format!("/quarantine/{id}")))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let body = axum::body::to_bytes(again.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "NOT_QUARANTINED", "{v}");
    let bad = app
        .clone()
        .oneshot(call("DELETE", "/quarantine/not-an-id".into()))
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let list = app
        .oneshot(call("GET", "/quarantine".into()))
        .await
        .unwrap();
    let body = axum::body::to_bytes(list.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["quarantine"].as_array().unwrap().len(), 0, "{v}");
}
