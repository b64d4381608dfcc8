//! The HTTP API through the router (`tower::ServiceExt::oneshot`): every
//! route, and bad input of every kind answering the right status and code
//! while changing nothing.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use entente_model::{NodeId, RecordId, Schema};
use entente_node::api::{
    self, ApiConfig, ApiState, HookError, NetMetrics, NodeHooks, PeerInfo, StandaloneHooks,
};
use entente_node::{Store, SystemClock};
use serde_json::{Value as Json, json};
use tower::ServiceExt;

const HOST: &str = "127.0.0.1:7070";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn store(node: u8) -> Store {
    Store::memory(
        Arc::new(Schema::default_crm()),
        NodeId([node; 16]),
        Arc::new(SystemClock),
    )
}

fn state_with(hooks: Arc<dyn NodeHooks>, require_token: bool) -> ApiState {
    let config = ApiConfig::for_addr(
        HOST.parse().unwrap(),
        Some(TOKEN.to_string()),
        require_token,
    )
    .unwrap();
    ApiState::new(store(1), hooks, config)
}

fn app() -> (Router, ApiState) {
    let state = state_with(Arc::new(StandaloneHooks), false);
    (api::router(state.clone()), state)
}

/// One answer: status, content type, raw body, and the body as JSON if it
/// is JSON.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: String,
    text: String,
    bytes: Vec<u8>,
    json: Json,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
    Answer {
        status,
        content_type,
        text,
        bytes,
        json,
    }
}

fn req(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", HOST)
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Json>) -> Answer {
    let r = match body {
        Some(b) => req(method, uri)
            .header("content-type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => req(method, uri).body(Body::empty()).unwrap(),
    };
    send(app, r).await
}

async fn raw(app: &Router, method: &str, uri: &str, ct: &str, body: Vec<u8>) -> Answer {
    let mut b = req(method, uri);
    if !ct.is_empty() {
        b = b.header("content-type", ct);
    }
    send(app, b.body(Body::from(body)).unwrap()).await
}

async fn create(app: &Router, collection: &str, fields: Json) -> Json {
    let a = call(
        app,
        "POST",
        &format!("/collections/{collection}/records"),
        Some(json!({ "fields": fields })),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    a.json["record"].clone()
}

/// Everything observable that a refused request must leave alone.
fn snapshot(state: &ApiState) -> (u64, u64, Vec<String>) {
    let mut guard = state.store.lock().unwrap();
    let s = guard.as_mut().unwrap();
    let stats = s.stats().unwrap();
    let mut all = Vec::new();
    for c in ["contacts", "phones", "tags"] {
        for r in s.list(c, None, 10_000, true).unwrap().records {
            all.push(serde_json::to_string(&r).unwrap());
        }
    }
    (stats.feed_seq, stats.records, all)
}

fn assert_error(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.json["code"], json!(code), "{}", a.text);
    assert!(
        a.json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        a.text
    );
}

#[tokio::test]
async fn records_are_created_read_updated_deleted_restored_with_history_and_raw_bytes() {
    let (app, _) = app();
    let r = create(
        &app,
        "contacts",
        json!({ "first_name": "John", "email": "John@Example.org" }),
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["collection"], "contacts");
    assert_eq!(r["deleted"], false);
    assert_eq!(r["fields"]["first_name"], "John");
    assert!(!r["heads"].as_array().unwrap().is_empty());
    assert_eq!(r["created_by"], json!(NodeId([1; 16])));
    assert!(r["created_at"].as_i64().unwrap() > 0);

    let g = call(&app, "GET", &format!("/records/{id}"), None).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.json["fields"], r["fields"]);
    assert_eq!(g.json["updated_by"], json!(NodeId([1; 16])));

    let u = call(
        &app,
        "PATCH",
        &format!("/records/{id}"),
        Some(json!({ "fields": { "city": "Zurich", "first_name": null } })),
    )
    .await;
    assert_eq!(u.status, StatusCode::OK, "{}", u.text);
    assert_eq!(u.json["record"]["fields"]["city"], "Zurich");
    assert!(u.json["record"]["fields"].get("first_name").is_none());
    assert!(u.json["change"].is_string());
    assert_eq!(u.json["concurrent"], json!([]));

    let d = call(&app, "DELETE", &format!("/records/{id}"), None).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.json["record"]["deleted"], true);
    let edit_deleted = call(
        &app,
        "PATCH",
        &format!("/records/{id}"),
        Some(json!({ "fields": { "city": "Bern" } })),
    )
    .await;
    assert_error(&edit_deleted, StatusCode::CONFLICT, "RECORD_DELETED");

    let rs = call(&app, "POST", &format!("/records/{id}/restore"), None).await;
    assert_eq!(rs.status, StatusCode::OK, "{}", rs.text);
    assert_eq!(rs.json["record"]["deleted"], false);
    let again = call(&app, "POST", &format!("/records/{id}/restore"), None).await;
    assert_error(&again, StatusCode::CONFLICT, "RECORD_NOT_DELETED");

    let h = call(&app, "GET", &format!("/records/{id}/history"), None).await;
    assert_eq!(h.status, StatusCode::OK);
    let hist = h.json["history"].as_array().unwrap();
    assert_eq!(hist.len(), 4, "{}", h.text);
    assert!(hist.iter().any(|e| e["deleted"] == true));
    assert!(hist.iter().any(|e| e["restored"] == true));
    assert!(hist.iter().all(|e| e["node"] == json!(NodeId([1; 16]))));

    let bytes = call(&app, "GET", &format!("/records/{id}/raw"), None).await;
    assert_eq!(bytes.status, StatusCode::OK);
    assert_eq!(bytes.content_type, "application/octet-stream");
    let doc = entente_model::automerge::Automerge::load(&bytes.bytes).unwrap();
    use entente_model::automerge::ReadDoc;
    let (v, _) = doc
        .get(entente_model::automerge::ROOT, "city")
        .unwrap()
        .unwrap();
    assert_eq!(v.as_str(), Some("Zurich"));
}

#[tokio::test]
async fn a_duplicate_answers_409_with_the_holder_and_changes_nothing_unless_forced() {
    let (app, state) = app();
    let first = create(&app, "contacts", json!({ "email": "ann@example.org" })).await;
    let before = snapshot(&state);
    let dup = call(
        &app,
        "POST",
        "/collections/contacts/records",
        Some(json!({ "fields": { "email": " ANN@example.org " } })),
    )
    .await;
    assert_error(&dup, StatusCode::CONFLICT, "DUPLICATE_EMAIL");
    assert_eq!(dup.json["existing"], first["id"]);
    assert_eq!(dup.json["field"], "email");
    assert_eq!(snapshot(&state), before);

    let other = create(&app, "contacts", json!({ "email": "bob@example.org" })).await;
    let by_update = call(
        &app,
        "PATCH",
        &format!("/records/{}", other["id"].as_str().unwrap()),
        Some(json!({ "fields": { "email": "ann@example.org" } })),
    )
    .await;
    assert_error(&by_update, StatusCode::CONFLICT, "DUPLICATE_EMAIL");
    assert_eq!(by_update.json["existing"], first["id"]);

    let same_id = call(
        &app,
        "POST",
        "/collections/contacts/records",
        Some(json!({ "id": first["id"], "fields": {} })),
    )
    .await;
    assert_error(&same_id, StatusCode::CONFLICT, "ALREADY_EXISTS");

    let forced = call(
        &app,
        "POST",
        "/collections/contacts/records",
        Some(json!({ "fields": { "email": "ann@example.org" }, "force": true })),
    )
    .await;
    assert_eq!(forced.status, StatusCode::CREATED, "{}", forced.text);
}

#[tokio::test]
async fn an_edit_based_on_old_heads_merges_and_lists_the_concurrently_changed_fields() {
    let (app, _) = app();
    let r = create(
        &app,
        "contacts",
        json!({ "first_name": "John", "city": "Basel" }),
    )
    .await;
    let id = r["id"].as_str().unwrap();
    let base = r["heads"].clone();
    let online = call(
        &app,
        "PATCH",
        &format!("/records/{id}"),
        Some(json!({ "fields": { "city": "Bern" } })),
    )
    .await;
    assert_eq!(online.status, StatusCode::OK);
    let offline = call(
        &app,
        "PATCH",
        &format!("/records/{id}"),
        Some(json!({ "fields": { "city": "Geneva", "first_name": "Johnny" }, "base": base })),
    )
    .await;
    assert_eq!(offline.status, StatusCode::OK, "{}", offline.text);
    let c = offline.json["concurrent"].as_array().unwrap();
    assert_eq!(c.len(), 1, "{}", offline.text);
    assert_eq!(c[0]["field"], "city");
    assert_eq!(c[0]["base_value"], "Basel");
    assert_eq!(c[0]["existing_value"], "Bern");
    assert_eq!(c[0]["new_value"], "Geneva");
    assert_eq!(offline.json["record"]["fields"]["first_name"], "Johnny");
}

#[tokio::test]
async fn bad_input_answers_the_right_status_and_code_and_changes_nothing() {
    let (app, state) = app();
    let r = create(&app, "contacts", json!({ "email": "x@example.org" })).await;
    let id = r["id"].as_str().unwrap().to_string();
    let unknown = "0190a5d2-0000-7000-8000-000000000000";
    let before = snapshot(&state);
    let huge = json!({ "fields": { "notes": "x".repeat(2 << 20) } });
    let cases: Vec<(&str, String, Option<String>, StatusCode, &str)> = vec![
        (
            "POST",
            "/collections/contacts/records".into(),
            Some("{\"fields\": {".into()),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "POST",
            "/collections/clients/records".into(),
            Some(r#"{"fields": {"email": "a@b.c"}}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_COLLECTION",
        ),
        (
            "POST",
            "/collections/contacts/records".into(),
            Some(r#"{"fields": {"shoe_size": "44"}}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_FIELD",
        ),
        (
            "POST",
            "/collections/contacts/records".into(),
            Some(r#"{"fields": {"do_not_email": "maybe"}}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "WRONG_TYPE",
        ),
        (
            "POST",
            "/collections/tags/records".into(),
            Some(r#"{"fields": {"weight": 3}}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "MISSING_REQUIRED_FIELD",
        ),
        (
            "POST",
            "/collections/phones/records".into(),
            Some(format!(
                r#"{{"fields": {{"contact_id": "{unknown}", "number": "1"}}}}"#
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            "BAD_REFERENCE",
        ),
        (
            "POST",
            "/collections/contacts/records".into(),
            Some(r#"{"id": "not-an-id", "fields": {}}"#.into()),
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
        ),
        (
            "POST",
            "/collections/contacts/records".into(),
            Some(r#"{"fields": {}, "colour": "red"}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "POST",
            "/collections/contacts/records".into(),
            Some(r#"{"fields": 5}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "PATCH",
            format!("/records/{id}"),
            Some(r#"{"fields": {"city": "Bern"}, "base": ["zz"]}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_HEADS",
        ),
        (
            "PATCH",
            format!("/records/{id}"),
            Some(format!(
                r#"{{"fields": {{"city": "Bern"}}, "base": ["{}"]}}"#,
                "ab".repeat(32)
            )),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_HEADS",
        ),
        (
            "PATCH",
            format!("/records/{unknown}"),
            Some(r#"{"fields": {"city": "Bern"}}"#.into()),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "GET",
            format!("/records/{unknown}"),
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "DELETE",
            format!("/records/{unknown}"),
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "POST",
            format!("/records/{unknown}/restore"),
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "GET",
            format!("/records/{unknown}/history"),
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "GET",
            format!("/records/{unknown}/raw"),
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "GET",
            "/records/nope".into(),
            None,
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
        ),
        (
            "POST",
            format!("/records/{id}/restore"),
            Some("{oops".into()),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "GET",
            "/collections/clients/records".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_COLLECTION",
        ),
        (
            "GET",
            "/collections/contacts/records?shoe_size=44".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_FIELD",
        ),
        (
            "GET",
            "/collections/contacts/records?limit=0".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/collections/contacts/records?after=zz".into(),
            None,
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
        ),
        (
            "GET",
            "/changes?since=-1".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/changes?limit=0".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/changes?wait=61".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/changes?colour=red".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/collisions?kind=odd".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            "/collisions?status=odd".into(),
            None,
            StatusCode::BAD_REQUEST,
            "BAD_QUERY",
        ),
        (
            "GET",
            format!("/collisions/{}", "ab".repeat(16)),
            None,
            StatusCode::NOT_FOUND,
            "COLLISION_NOT_FOUND",
        ),
        (
            "GET",
            "/collisions/xyz".into(),
            None,
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
        ),
        (
            "POST",
            format!("/collisions/{}/resolve", "ab".repeat(16)),
            Some(r#"{"restore": true}"#.into()),
            StatusCode::NOT_FOUND,
            "COLLISION_NOT_FOUND",
        ),
        (
            "POST",
            format!("/collisions/{}/resolve", "ab".repeat(16)),
            Some(r#"{"explode": true}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
        (
            "GET",
            "/export?collection=clients".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_COLLECTION",
        ),
        (
            "GET",
            "/nowhere".into(),
            None,
            StatusCode::NOT_FOUND,
            "NO_ROUTE",
        ),
        (
            "PUT",
            "/status".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "POST",
            "/peers".into(),
            Some(r#"{"addr": 7}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_BODY",
        ),
    ];
    for (method, uri, body, status, code) in cases {
        let a = match body {
            Some(b) => {
                raw(
                    &app,
                    method,
                    &uri,
                    "application/json",
                    b.as_bytes().to_vec(),
                )
                .await
            }
            None => call(&app, method, &uri, None).await,
        };
        assert_eq!(a.status, status, "{method} {uri}: {}", a.text);
        assert_eq!(a.json["code"], json!(code), "{method} {uri}: {}", a.text);
        assert_eq!(snapshot(&state), before, "{method} {uri} changed something");
    }
    let too_big = call(&app, "POST", "/collections/contacts/records", Some(huge)).await;
    assert_error(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE");
    let no_type = raw(
        &app,
        "POST",
        "/collections/contacts/records",
        "",
        br#"{"fields": {}}"#.to_vec(),
    )
    .await;
    assert_error(
        &no_type,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    let form = raw(
        &app,
        "POST",
        "/import",
        "application/x-www-form-urlencoded",
        b"a=b".to_vec(),
    )
    .await;
    assert_error(
        &form,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    assert_eq!(snapshot(&state), before);
}

#[tokio::test]
async fn the_token_is_required_everywhere_but_health_when_configured() {
    let state = state_with(Arc::new(StandaloneHooks), true);
    let app = api::router(state.clone());
    let health = call(&app, "GET", "/health", None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json["ok"], true);
    let before = snapshot(&state);
    for (method, uri) in [
        ("GET", "/status"),
        ("GET", "/collections/contacts/records"),
        ("POST", "/collections/contacts/records"),
        ("GET", "/changes"),
        ("GET", "/nowhere"),
    ] {
        let missing = send(
            &app,
            req(method, uri)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"fields": {"email": "t@example.org"}}"#))
                .unwrap(),
        )
        .await;
        assert_error(&missing, StatusCode::UNAUTHORIZED, "TOKEN_REQUIRED");
        let wrong = send(
            &app,
            req(method, uri)
                .header("authorization", format!("Bearer {}x", &TOKEN[1..]))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"fields": {"email": "t@example.org"}}"#))
                .unwrap(),
        )
        .await;
        assert_error(&wrong, StatusCode::UNAUTHORIZED, "BAD_TOKEN");
    }
    assert_eq!(snapshot(&state), before);
    let ok = send(
        &app,
        req("POST", "/collections/contacts/records")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Body::from(r#"{"fields": {"email": "t@example.org"}}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
}

#[test]
fn a_non_loopback_address_requires_a_token() {
    let any: std::net::SocketAddr = "0.0.0.0:7070".parse().unwrap();
    assert!(ApiConfig::for_addr(any, None, false).is_err());
    let c = ApiConfig::for_addr(any, Some(TOKEN.into()), false).unwrap();
    assert!(c.require_token);
    let lo: std::net::SocketAddr = "127.0.0.1:7070".parse().unwrap();
    let c = ApiConfig::for_addr(lo, None, false).unwrap();
    assert!(!c.require_token);
    assert!(ApiConfig::for_addr(lo, None, true).is_err());
}

#[tokio::test]
async fn a_foreign_host_or_origin_is_refused() {
    let (app, state) = app();
    let before = snapshot(&state);
    let rebound = send(
        &app,
        Request::builder()
            .method("POST")
            .uri("/collections/contacts/records")
            .header("host", "attacker.example:7070")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"fields": {}}"#))
            .unwrap(),
    )
    .await;
    assert_error(&rebound, StatusCode::MISDIRECTED_REQUEST, "BAD_HOST");
    let cross = send(
        &app,
        req("POST", "/collections/contacts/records")
            .header("origin", "http://attacker.example")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"fields": {}}"#))
            .unwrap(),
    )
    .await;
    assert_error(&cross, StatusCode::FORBIDDEN, "FORBIDDEN_ORIGIN");
    assert_eq!(snapshot(&state), before);
    let localhost = send(
        &app,
        Request::builder()
            .uri("/health")
            .header("host", "localhost:7070")
            .header("origin", "http://localhost:7070")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(localhost.status, StatusCode::OK);
    assert!(localhost.json.get("ok").is_some());
    let headers_allow_cors = call(&app, "GET", "/status", None).await;
    assert_eq!(headers_allow_cors.status, StatusCode::OK);
}

#[tokio::test]
async fn lists_page_by_cursor_filter_by_field_and_include_deleted_on_request() {
    let (app, _) = app();
    let mut ids = Vec::new();
    for i in 0..25 {
        let city = if i % 5 == 0 { "Bern" } else { "Basel" };
        let r = create(
            &app,
            "contacts",
            json!({ "email": format!("p{i}@example.org"), "city": city }),
        )
        .await;
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    call(&app, "DELETE", &format!("/records/{}", ids[3]), None).await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let uri = match &after {
            Some(a) => format!("/collections/contacts/records?limit=10&after={a}"),
            None => "/collections/contacts/records?limit=10".into(),
        };
        let page = call(&app, "GET", &uri, None).await;
        assert_eq!(page.status, StatusCode::OK);
        let recs = page.json["records"].as_array().unwrap();
        assert!(recs.len() <= 10);
        seen.extend(recs.iter().map(|r| r["id"].as_str().unwrap().to_string()));
        match page.json["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let mut live: Vec<String> = ids.iter().filter(|i| **i != ids[3]).cloned().collect();
    live.sort();
    assert_eq!(seen, live);
    let bern = call(&app, "GET", "/collections/contacts/records?city=Bern", None).await;
    let bern = bern.json["records"].as_array().unwrap().clone();
    assert_eq!(bern.len(), 5);
    assert!(bern.iter().all(|r| r["fields"]["city"] == "Bern"));
    let with_deleted = call(
        &app,
        "GET",
        "/collections/contacts/records?deleted=true&limit=1000",
        None,
    )
    .await;
    assert_eq!(with_deleted.json["records"].as_array().unwrap().len(), 25);
    let two_bern = call(
        &app,
        "GET",
        "/collections/contacts/records?city=Bern&limit=2",
        None,
    )
    .await;
    assert_eq!(two_bern.json["records"].as_array().unwrap().len(), 2);
    let next = two_bern.json["next"].as_str().unwrap();
    let rest = call(
        &app,
        "GET",
        &format!("/collections/contacts/records?city=Bern&after={next}"),
        None,
    )
    .await;
    assert_eq!(rest.json["records"].as_array().unwrap().len(), 3);
    assert!(rest.json["next"].is_null());
}

fn lines(text: &str) -> Vec<Json> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn the_changes_feed_lists_each_changed_record_once_since_a_sequence_and_long_polls() {
    let (app, _) = app();
    let a = create(&app, "contacts", json!({ "email": "a@example.org" })).await;
    let b = create(&app, "contacts", json!({ "email": "b@example.org" })).await;
    call(
        &app,
        "PATCH",
        &format!("/records/{}", a["id"].as_str().unwrap()),
        Some(json!({ "fields": { "city": "Bern" } })),
    )
    .await;
    let all = call(&app, "GET", "/changes", None).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.content_type, "application/x-ndjson");
    let entries = lines(&all.text);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["id"], b["id"]);
    assert_eq!(entries[1]["id"], a["id"]);
    assert_eq!(entries[1]["seq"], 3);
    assert_eq!(entries[1]["collection"], "contacts");
    assert_eq!(entries[1]["deleted"], false);
    assert_eq!(entries[1]["fields"]["city"], "Bern");
    let since = call(&app, "GET", "/changes?since=2&limit=5", None).await;
    assert_eq!(lines(&since.text).len(), 1);
    let limited = call(&app, "GET", "/changes?limit=1", None).await;
    assert_eq!(lines(&limited.text).len(), 1);
    let empty = call(&app, "GET", "/changes?since=3", None).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.text, "");

    // A long poll answers as soon as something changes.
    let poller = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, "GET", "/changes?since=3&wait=60", None).await })
    };
    tokio::task::yield_now().await;
    let c = create(&app, "contacts", json!({ "email": "c@example.org" })).await;
    let got = poller.await.unwrap();
    let got = lines(&got.text);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], c["id"]);
    assert_eq!(got[0]["seq"], 4);
}

/// Makes an open duplicate collision: node 2 creates the same e-mail
/// concurrently and its change arrives.
fn concurrent_duplicate(state: &ApiState, email: &str) -> (RecordId, RecordId) {
    let mut other = store(2);
    let theirs = other
        .create(
            "contacts",
            None,
            json!({ "email": email, "city": "Lausanne" })
                .as_object()
                .unwrap(),
            false,
        )
        .unwrap()
        .record
        .id;
    let changes = other.changes_for(&theirs, &[]).unwrap();
    let mut guard = state.store.lock().unwrap();
    let s = guard.as_mut().unwrap();
    let ours = s
        .create(
            "contacts",
            None,
            json!({ "email": email, "city": "Geneva" })
                .as_object()
                .unwrap(),
            false,
        )
        .unwrap()
        .record
        .id;
    let report = s.apply_remote(vec![(theirs.clone(), changes)]).unwrap();
    assert!(report.rejected.is_empty());
    (ours, theirs)
}

#[tokio::test]
async fn collisions_are_listed_shown_side_by_side_and_resolved() {
    let (app, state) = app();
    let (ours, theirs) = concurrent_duplicate(&state, "dup@example.org");
    let open = call(&app, "GET", "/collisions", None).await;
    assert_eq!(open.status, StatusCode::OK);
    let list = open.json["collisions"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{}", open.text);
    let c = &list[0];
    assert_eq!(c["kind"], "duplicate");
    assert_eq!(c["status"]["state"], "open");
    assert_eq!(c["collection"], "contacts");
    assert_eq!(c["records"].as_array().unwrap().len(), 2);
    assert_eq!(c["sides"].as_array().unwrap().len(), 2);
    let cid = c["id"].as_str().unwrap().to_string();
    let none = call(&app, "GET", "/collisions?kind=update_delete", None).await;
    assert_eq!(none.json["collisions"], json!([]));
    let by_coll = call(&app, "GET", "/collisions?collection=phones", None).await;
    assert_eq!(by_coll.json["collisions"], json!([]));
    let both = call(
        &app,
        "GET",
        "/collisions?kind=duplicate&collection=contacts",
        None,
    )
    .await;
    assert_eq!(both.json["collisions"].as_array().unwrap().len(), 1);

    let show = call(&app, "GET", &format!("/collisions/{cid}"), None).await;
    assert_eq!(show.status, StatusCode::OK);
    let table = show.json["table"].as_array().unwrap();
    let city = table.iter().find(|r| r["field"] == "city").unwrap();
    assert_eq!(city["differs"], true);
    let cities: Vec<&Json> = city["sides"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["value"])
        .collect();
    assert!(cities.contains(&&json!("Geneva")) && cities.contains(&&json!("Lausanne")));
    let email = table.iter().find(|r| r["field"] == "email").unwrap();
    assert_eq!(email["differs"], false);

    let get = call(&app, "GET", &format!("/records/{ours}"), None).await;
    assert_eq!(get.json["open_collisions"], json!([cid]));

    let before = snapshot(&state);
    let bad = call(
        &app,
        "POST",
        &format!("/collisions/{cid}/resolve"),
        Some(json!({ "confirm_delete": true })),
    )
    .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_RESOLUTION");
    assert_eq!(snapshot(&state), before);

    let done = call(
        &app,
        "POST",
        &format!("/collisions/{cid}/resolve"),
        Some(json!({ "merge_into": ours, "keep": { "city": theirs } })),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
    assert_eq!(done.json["collision"]["status"]["state"], "resolved");
    let recs = done.json["records"].as_array().unwrap();
    let survivor = recs.iter().find(|r| r["id"] == json!(ours)).unwrap();
    assert_eq!(survivor["fields"]["city"], "Lausanne");
    let merged = call(&app, "GET", &format!("/records/{theirs}"), None).await;
    assert_eq!(merged.json["id"], json!(ours));
    assert_eq!(merged.json["requested_id"], json!(theirs));
    let open = call(&app, "GET", "/collisions", None).await;
    assert_eq!(open.json["collisions"], json!([]));
    let resolved = call(&app, "GET", "/collisions?status=resolved", None).await;
    assert_eq!(resolved.json["collisions"].as_array().unwrap().len(), 1);
    let all = call(&app, "GET", "/collisions?status=all&kind=duplicate", None).await;
    assert_eq!(all.json["collisions"].as_array().unwrap().len(), 1);
    let twice = call(
        &app,
        "POST",
        &format!("/collisions/{cid}/resolve"),
        Some(json!({ "merge_into": ours })),
    )
    .await;
    assert_error(
        &twice,
        StatusCode::UNPROCESSABLE_ENTITY,
        "INVALID_RESOLUTION",
    );
}

async fn import(app: &Router, body: &str) -> Answer {
    raw(
        app,
        "POST",
        "/import",
        "application/x-ndjson",
        body.as_bytes().to_vec(),
    )
    .await
}

#[tokio::test]
async fn import_lands_good_lines_reports_bad_ones_by_number_and_is_idempotent() {
    let (app, state) = app();
    let known = create(&app, "contacts", json!({ "email": "known@example.org" })).await;
    let id = "0190a5d2-0000-7000-8000-00000000abcd";
    let text = [
        r#"{"collection": "contacts", "fields": {"email": "a@example.org"}}"#.to_string(),
        r#"{"collection": "contacts", "fields": {"email": "b@example.org"#.to_string(),
        String::new(),
        format!(
            r#"{{"collection": "contacts", "id": "{id}", "fields": {{"email": "c@example.org"}}}}"#
        ),
        r#"{"collection": "clients", "fields": {}}"#.to_string(),
        r#"{"collection": "contacts", "fields": {"email": "KNOWN@example.org", "city": "Bern"}}"#
            .to_string(),
        r#"{"collection": "contacts", "fields": {"do_not_email": "maybe"}}"#.to_string(),
        r#"{"fields": {}}"#.to_string(),
        r#"{"collection": "contacts", "fields": {"email": "d@example.org"}}"#.to_string(),
    ]
    .join("\n");
    let a = import(&app, &text).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["lines"], 8);
    assert_eq!(a.json["created"], 3, "{}", a.text);
    assert_eq!(a.json["updated"], 1, "{}", a.text);
    assert_eq!(a.json["failed"], 4);
    let errs: Vec<(u64, String)> = a.json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        errs,
        vec![
            (2, "MALFORMED_JSON".into()),
            (5, "UNKNOWN_COLLECTION".into()),
            (7, "WRONG_TYPE".into()),
            (8, "INVALID_LINE".into()),
        ]
    );
    let k = call(
        &app,
        "GET",
        &format!("/records/{}", known["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(k.json["fields"]["city"], "Bern");
    let c = call(&app, "GET", &format!("/records/{id}"), None).await;
    assert_eq!(c.json["fields"]["email"], "c@example.org");

    let before = snapshot(&state);
    let again = import(&app, &text).await;
    assert_eq!(again.json["created"], 0, "{}", again.text);
    assert_eq!(again.json["updated"], 0);
    assert_eq!(again.json["unchanged"], 4);
    assert_eq!(again.json["failed"], 4);
    assert_eq!(snapshot(&state), before);

    let clash = import(
        &app,
        &format!(
            r#"{{"collection": "contacts", "id": "{id}", "fields": {{"email": "a@example.org"}}}}"#
        ),
    )
    .await;
    assert_eq!(
        clash.json["errors"][0]["code"], "DUPLICATE_EMAIL",
        "{}",
        clash.text
    );
    assert_eq!(snapshot(&state), before);
}

#[tokio::test]
async fn export_streams_every_record_or_one_collection_as_importable_lines() {
    let (app, _) = app();
    let john = create(&app, "contacts", json!({ "email": "john@example.org" })).await;
    create(&app, "contacts", json!({ "email": "jane@example.org" })).await;
    create(
        &app,
        "phones",
        json!({ "contact_id": john["id"], "number": "+41 44 000 00 00" }),
    )
    .await;
    let all = call(&app, "GET", "/export", None).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.content_type, "application/x-ndjson");
    let all = lines(&all.text);
    assert_eq!(all.len(), 3);
    for l in &all {
        for key in ["id", "collection", "fields", "deleted", "heads"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
    }
    let phones = lines(
        &call(&app, "GET", "/export?collection=phones", None)
            .await
            .text,
    );
    assert_eq!(phones.len(), 1);
    assert_eq!(phones[0]["fields"]["contact_id"], john["id"]);

    // The exported lines import into an empty node as the same records.
    let (fresh, _) = self::app();
    let body: String = all.iter().map(|l| format!("{l}\n")).collect();
    let r = import(&fresh, &body).await;
    assert_eq!(r.json["created"], 3, "{}", r.text);
    let again = lines(&call(&fresh, "GET", "/export", None).await.text);
    let fields = |v: &[Json]| {
        v.iter()
            .map(|l| (l["id"].clone(), l["fields"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(fields(&again), fields(&all));
}

#[tokio::test]
async fn status_metrics_and_schema_describe_the_node() {
    let (app, state) = app();
    create(&app, "contacts", json!({ "email": "s@example.org" })).await;
    concurrent_duplicate(&state, "dup@example.org");
    let s = call(&app, "GET", "/status", None).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.json["node_id"], json!(NodeId([1; 16])));
    assert_eq!(s.json["peers"], 0);
    assert_eq!(s.json["networked"], false);
    assert_eq!(s.json["records"], 3);
    assert_eq!(s.json["feed_seq"], 3);
    assert_eq!(s.json["open_collisions"], 1);
    assert_eq!(s.json["open_collisions_by_kind"]["duplicate"], 1);
    let m = call(&app, "GET", "/metrics", None).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.content_type.starts_with("text/plain"));
    assert!(m.text.contains("entente_records 3\n"), "{}", m.text);
    assert!(
        m.text
            .contains("entente_open_collisions{kind=\"duplicate\"} 1\n")
    );
    assert!(
        m.text
            .contains("entente_open_collisions{kind=\"update_delete\"} 0\n")
    );
    assert!(m.text.contains("# TYPE entente_bytes_in_total counter\n"));
    let schema = call(&app, "GET", "/schema", None).await;
    assert_eq!(
        schema.json["collections"]["contacts"]["fields"]["do_not_email"]["type"],
        "boolean"
    );
    assert_eq!(
        schema.json["fingerprint"],
        Schema::default_crm().fingerprint()
    );
}

#[tokio::test]
async fn peer_admin_without_a_network_answers_no_network() {
    let (app, _) = app();
    let peers = call(&app, "GET", "/peers", None).await;
    assert_eq!(peers.status, StatusCode::OK);
    assert_eq!(peers.json["peers"], json!([]));
    for (method, uri, body) in [
        (
            "POST",
            "/peers",
            Some(json!({ "addr": "/ip4/127.0.0.1/tcp/1" })),
        ),
        ("DELETE", "/peers/p1", None),
        ("POST", "/peers/p1/block", None),
        ("POST", "/peers/p1/unblock", None),
    ] {
        let a = call(&app, method, uri, body).await;
        assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "NO_NETWORK");
    }
}

/// Hooks that record what the API told the node, and answer peer calls.
#[derive(Debug, Default)]
struct Recording {
    changes: Mutex<Vec<(RecordId, Vec<String>)>>,
    blocked: Mutex<Vec<String>>,
}

impl NodeHooks for Recording {
    fn local_change(&self, id: &RecordId, heads: &[String]) {
        self.changes
            .lock()
            .unwrap()
            .push((id.clone(), heads.to_vec()));
    }
    fn peers(&self) -> Vec<PeerInfo> {
        vec![PeerInfo {
            id: "p1".into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7071".into()],
            connected: true,
            blocked: false,
            lag: Some(7),
            ..Default::default()
        }]
    }
    fn add_peer(&self, addr: &str) -> Result<PeerInfo, HookError> {
        if addr.starts_with('/') {
            Ok(PeerInfo {
                id: "p2".into(),
                addrs: vec![addr.into()],
                ..Default::default()
            })
        } else {
            Err(HookError {
                status: 400,
                code: "BAD_ADDRESS".into(),
                message: "not a multiaddr".into(),
            })
        }
    }
    fn remove_peer(&self, _id: &str) -> Result<(), HookError> {
        Ok(())
    }
    fn block(&self, id: &str) -> Result<(), HookError> {
        self.blocked.lock().unwrap().push(id.to_string());
        Ok(())
    }
    fn unblock(&self, _id: &str) -> Result<(), HookError> {
        Ok(())
    }
    fn metrics(&self) -> NetMetrics {
        NetMetrics {
            applied_changes: 11,
            bytes_in: 1234,
            bytes_out: 99,
            records_rejected: 2,
            records_ignored: 3,
        }
    }
    fn networked(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn the_node_hears_of_every_local_write_and_answers_peer_calls() {
    let hooks = Arc::new(Recording::default());
    let state = state_with(hooks.clone(), false);
    let app = api::router(state.clone());
    let r = create(&app, "contacts", json!({ "email": "h@example.org" })).await;
    let id = r["id"].as_str().unwrap();
    let u = call(
        &app,
        "PATCH",
        &format!("/records/{id}"),
        Some(json!({ "fields": { "city": "Bern" } })),
    )
    .await;
    call(&app, "DELETE", &format!("/records/{id}"), None).await;
    // An edit that changes nothing is not a change.
    call(&app, "DELETE", &format!("/records/{id}"), None).await;
    import(
        &app,
        r#"{"collection": "contacts", "fields": {"email": "i@example.org"}}"#,
    )
    .await;
    let changes = hooks.changes.lock().unwrap().clone();
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(
        changes[1].1,
        serde_json::from_value::<Vec<String>>(u.json["record"]["heads"].clone()).unwrap()
    );

    let s = call(&app, "GET", "/status", None).await;
    assert_eq!(s.json["peers"], 1);
    assert_eq!(s.json["connected_peers"], 1);
    assert_eq!(s.json["records_rejected"], 2);
    assert_eq!(s.json["records_ignored"], 3);
    let m = call(&app, "GET", "/metrics", None).await;
    assert!(
        m.text.contains("entente_peer_sync_lag{peer=\"p1\"} 7\n"),
        "{}",
        m.text
    );
    assert!(m.text.contains("entente_bytes_in_total 1234\n"));
    assert!(m.text.contains("entente_applied_changes_total 11\n"));
    assert!(m.text.contains("entente_records_rejected_total 2\n"));
    assert!(m.text.contains("entente_records_ignored_total 3\n"));
    let added = call(
        &app,
        "POST",
        "/peers",
        Some(json!({ "addr": "/ip4/10.0.0.1/tcp/1" })),
    )
    .await;
    assert_eq!(added.status, StatusCode::CREATED);
    assert_eq!(added.json["peer"]["id"], "p2");
    let bad = call(&app, "POST", "/peers", Some(json!({ "addr": "nowhere" }))).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "BAD_ADDRESS");
    let blocked = call(&app, "POST", "/peers/p1/block", None).await;
    assert_eq!(blocked.status, StatusCode::OK);
    assert_eq!(*hooks.blocked.lock().unwrap(), vec!["p1".to_string()]);
}

#[tokio::test]
async fn the_api_serves_on_a_real_listener_and_shuts_down() {
    let (_, state) = app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The config names port 7070; a real listener elsewhere needs its own.
    let config = ApiConfig::for_addr(addr, None, false).unwrap();
    let state = state.with_config(config);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, state, async move {
        let _ = rx.await;
    }));
    // A plain HTTP/1.1 exchange over a socket, off the runtime's threads.
    let out = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("{\"ok\":true}"));
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
