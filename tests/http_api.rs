//! The relay's HTTPS API against a real relay process (TLS 1.3, its pinned certificate) and real
//! daemons: password sign-in as a web client, token refresh and reuse, `initialize`, `download`
//! with pages, ETag/304 and gzip, and every kind of bad request getting its status and a
//! message that names the problem. Another account's token sees none of this account's records.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{Device, Relay, TIMEOUT, call, wait_converged, wait_for_ok};
use ferry::relay::http::ErrorCode;
use ferry::relay::web_actor::RejectCode;
use ferry_proto::wire::ErrorKind;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use std::sync::Arc;

const PASSWORD: &str = "correct horse battery";

/// An HTTP response: status, headers and the body as received (still compressed if it was).
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether a JSON error answer's message mentions `what`.
    fn says(&self, what: &str) -> bool {
        self.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(what))
    }

    /// The error code of a JSON error answer.
    fn error(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A minimal HTTPS client pinned to the relay's certificate: one connection per request. It
/// keeps every answer, so a test can check them all against `docs/openapi.json`.
struct Api {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Runtime,
    answered: std::cell::RefCell<Vec<Answered>>,
}

/// What one request got, as `check_against_spec` needs it.
struct Answered {
    method: String,
    path: String,
    status: u16,
    body: Vec<u8>,
    compressed: bool,
}

impl Api {
    fn new(relay: &Relay) -> Api {
        Api {
            addr: relay.http.clone().expect("the relay serves HTTPS"),
            tls: common::https_tls(relay),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            answered: Default::default(),
        }
    }

    /// Every answer so far is one `docs/openapi.json` lists for its route, with a body its schema
    /// allows. Routes the file does not have (the 404 fallback) are skipped.
    fn check_against_spec(&self) {
        let spec = openapi();
        for answered in self.answered.borrow().iter() {
            let Answered {
                method,
                path,
                status,
                body,
                compressed,
            } = answered;
            let route = spec_route(&spec, path);
            let Some(operation) = spec["paths"][route.as_str()].get(method.to_lowercase()) else {
                assert_eq!(
                    *status, 404,
                    "{method} {path} answered {status} but is not in the spec"
                );
                continue;
            };
            let response = operation["responses"]
                .get(status.to_string())
                .unwrap_or_else(|| panic!("{method} {path}: status {status} is not in the spec"));
            let Some(schema) = response
                .pointer("/content/application~1json/schema")
                .filter(|_| !*compressed)
            else {
                continue;
            };
            let value: Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e})"));
            if let Err(problem) = conforms(&spec, schema, &value, "$") {
                panic!("{method} {path} {status}: {problem}\n{value}");
            }
        }
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
        self.runtime.block_on(async {
            let mut sender = common::https_connect(&self.addr, self.tls.clone()).await;
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .to_vec();
            self.answered.borrow_mut().push(Answered {
                method: method.to_string(),
                path: path.split('?').next().unwrap_or(path).to_string(),
                status,
                body: body.clone(),
                compressed: headers.contains_key("content-encoding"),
            });
            Answer {
                status,
                headers,
                body,
            }
        })
    }

    fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth));
        }
        self.send("POST", path, &headers, body.to_string().into_bytes())
    }

    fn get(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> Answer {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        self.send("GET", path, &headers, Vec::new())
    }

    /// Signs in as a web client of `account`; returns the whole token answer.
    fn login(&self, account: &str) -> Value {
        let answer = self.post(
            "/api/auth/login",
            None,
            &json!({ "account": account, "password": PASSWORD, "label": "test" }),
        );
        assert_eq!(answer.status, 200, "login: {}", answer.json());
        answer.json()
    }
}

/// The spec's route a request path falls under: itself, or a route with `{name}` segments that
/// match any one segment.
fn spec_route(spec: &Value, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    spec["paths"]
        .as_object()
        .and_then(|paths| {
            paths.keys().find(|route| {
                let parts: Vec<&str> = route.split('/').collect();
                parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(p, s)| p == s || (p.starts_with('{') && p.ends_with('}')))
            })
        })
        .cloned()
        .unwrap_or_else(|| path.to_string())
}

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
        .expect("docs/openapi.json is JSON")
}

/// Whether `value` fits `schema`, for the part of JSON Schema the spec uses: `$ref`, `type`
/// (one or several), `enum`, `required`, `properties`, `additionalProperties: false`, `items`.
fn conforms(spec: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = spec
            .pointer(reference.trim_start_matches('#'))
            .ok_or_else(|| format!("{at}: unknown $ref {reference}"))?;
        return conforms(spec, target, value, at);
    }
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let allowed: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !allowed.is_empty() && !allowed.contains(&kind(value)) {
        return Err(format!(
            "{at}: a {} where the spec says {allowed:?}",
            kind(value)
        ));
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(value)
    {
        return Err(format!("{at}: {value} is not one of the spec's {values:?}"));
    }
    if let Value::Object(object) = value {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Err(format!("{at}: `{name}` is missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => conforms(spec, field_schema, field, &format!("{at}.{name}"))?,
                None if schema["additionalProperties"] == json!(false) => {
                    return Err(format!("{at}: `{name}` is not in the spec"));
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            conforms(spec, item_schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn start_relay(dir: &std::path::Path) -> Relay {
    start_relay_with(dir, "")
}

/// The collections the write tests declare on the relay (and, for `Task`, on their devices).
const COLLECTIONS: &str = "[collections.Customer]\n[collections.Task]\nstrategy = \"manual\"\n\
                           [collections.Vault]\nencrypted = [\"pin\"]\n";

/// A relay with the tests' HTTP settings and `collections` (TOML) in its config, and the
/// accounts `default` and `other` with `PASSWORD`.
fn start_relay_with(dir: &std::path::Path, collections: &str) -> Relay {
    let relay = Relay::start_with_config(
        dir,
        None,
        &format!(
            "[relay]\nhttp_listen = \"127.0.0.1:0\"\nhttp_max_body_bytes = 65536\n\
             http_max_page = 50\nmin_app_version = \"1.2.0\"\nlogins_per_minute = 1000\n\
             enrolments_per_minute = 1000\nmetrics_token = \"scrape-token-for-tests\"\n\
             {collections}"
        ),
    );
    for account in ["default", "other"] {
        relay
            .operator()
            .add_account_with_password(account, PASSWORD);
    }
    relay
}

#[test]
fn sign_in_initialize_and_download_records_a_daemon_wrote() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);

    // A daemon writes records; they reach the relay.
    let device = Device::new();
    device.join(&relay);
    let daemon = device.start_daemon_logged();
    for n in 0..5 {
        call(
            &daemon,
            "put",
            json!({ "collection": "Customer", "id": format!("c{n}"), "fields": { "name": format!("n{n}"), "n": n } }),
        );
    }
    wait_converged(&[&daemon], 5);

    // Wrong password and unknown account: the same answer.
    let wrong = api.post(
        "/api/auth/login",
        None,
        &json!({ "account": "default", "password": "nope-nope-nope" }),
    );
    let unknown = api.post(
        "/api/auth/login",
        None,
        &json!({ "account": "nobody", "password": PASSWORD }),
    );
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(wrong.json(), unknown.json());

    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("access token");

    let init = api.post(
        "/api/sync/initialize",
        Some(access),
        &json!({ "device_id": "browser-1", "app_version": "1.3.0", "last_sync": 2 }),
    );
    assert_eq!(init.status, 200, "{}", init.json());
    let init = init.json();
    assert_eq!(init["cursor"], 5);
    assert_eq!(init["changes_since_last_sync"], 3);
    assert_eq!(init["app_version"]["compatible"], true);
    assert_eq!(
        init["protocol_version"],
        ferry_proto::wire::PROTOCOL_VERSION
    );
    let old_app = api.post(
        "/api/sync/initialize",
        Some(access),
        &json!({ "device_id": "browser-1", "app_version": "1.1.9", "last_sync": null }),
    );
    assert_eq!(old_app.json()["app_version"]["compatible"], false);

    // Pages of two records; the last page has no `next`.
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let page = api.get(
            &format!("/api/sync/download?since={since}&limit=2"),
            access,
            &[],
        );
        assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
        let page = page.json();
        for record in page["records"].as_array().expect("records") {
            seen.push((
                record["id"].as_str().unwrap_or("").to_string(),
                record["fields"]["name"].clone(),
            ));
        }
        match page["next"].as_u64() {
            Some(next) => since = next,
            None => break,
        }
    }
    let expected: Vec<_> = (0..5)
        .map(|n| (format!("c{n}"), json!(format!("n{n}"))))
        .collect();
    assert_eq!(seen, expected);

    // ETag: the same page again is 304 Not Modified; gzip when asked for.
    let first = api.get("/api/sync/download?since=0", access, &[]);
    let etag = first.header("etag").expect("an ETag").to_string();
    let again = api.get(
        "/api/sync/download?since=0",
        access,
        &[("if-none-match", &etag)],
    );
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    let zipped = api.get(
        "/api/sync/download?since=0",
        access,
        &[("accept-encoding", "gzip")],
    );
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(zipped.body.as_slice()),
        &mut unzipped,
    )
    .expect("gunzip");
    assert_eq!(
        serde_json::from_slice::<Value>(&unzipped).expect("JSON"),
        first.json()
    );
    // The gzip body is another representation, with its own ETag; `q=0` refuses gzip.
    let zipped_etag = zipped.header("etag").expect("an ETag").to_string();
    assert_ne!(zipped_etag, etag);
    assert_eq!(zipped.header("vary"), Some("accept-encoding"));
    let zipped_again = api.get(
        "/api/sync/download?since=0",
        access,
        &[("accept-encoding", "gzip"), ("if-none-match", &zipped_etag)],
    );
    assert_eq!(zipped_again.status, 304);
    let refused = api.get(
        "/api/sync/download?since=0",
        access,
        &[("accept-encoding", "gzip;q=0, identity")],
    );
    assert_eq!(refused.header("content-encoding"), None);
    assert_eq!(refused.json(), first.json());

    // A new write changes the page: the old ETag no longer matches.
    call(
        &daemon,
        "patch",
        json!({ "collection": "Customer", "id": "c0", "fields": { "name": "renamed" } }),
    );
    wait_converged(&[&daemon], 6);
    let changed = api.get(
        "/api/sync/download?since=0",
        access,
        &[("if-none-match", &etag)],
    );
    assert_eq!(changed.status, 200);
    let records = changed.json()["records"].clone();
    let c0 = records
        .as_array()
        .and_then(|r| r.iter().find(|r| r["id"] == "c0"))
        .expect("c0");
    assert_eq!(c0["fields"]["name"], "renamed");

    // Another account's client sees none of it.
    let other = api.login("other");
    let other_access = other["access_token"].as_str().expect("token");
    let theirs = api.get("/api/sync/download?since=0", other_access, &[]);
    assert_eq!(theirs.status, 200);
    assert_eq!(theirs.json()["records"], json!([]));
    assert_eq!(theirs.json()["head"], 0);
    api.check_against_spec();
    drop(daemon);
}

#[test]
fn bad_requests_get_their_status_and_say_what_is_wrong() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("token");
    let init = "/api/sync/initialize";

    let no_token = api.post(init, None, &json!({}));
    assert_eq!(
        (no_token.status, no_token.error()),
        (401, "unauthorized".into())
    );
    assert!(no_token.header("www-authenticate").is_some());
    let garbage = api.post(init, Some("not.a.token"), &json!({}));
    assert_eq!(garbage.status, 401);

    let not_json = api.send(
        "POST",
        init,
        &[("authorization", &format!("Bearer {access}"))],
        b"{not json".to_vec(),
    );
    assert_eq!(not_json.status, 400);
    assert!(not_json.says("not valid JSON"));
    let missing = api.post(init, Some(access), &json!({ "device_id": "x" }));
    assert_eq!(missing.status, 400);
    assert!(missing.says("app_version"), "{}", missing.json());
    let wrong_type = api.post(
        init,
        Some(access),
        &json!({ "device_id": "x", "app_version": "1.2.0", "last_sync": "yesterday" }),
    );
    assert_eq!(wrong_type.status, 400);
    assert!(wrong_type.says("last_sync"), "{}", wrong_type.json());
    let unknown_field = api.post(
        init,
        Some(access),
        &json!({ "device_id": "x", "app_version": "1.2.0", "colour": "blue" }),
    );
    assert_eq!(unknown_field.status, 400);
    let oversized = api.post(
        init,
        Some(access),
        &json!({ "device_id": "x".repeat(70_000), "app_version": "1" }),
    );
    assert_eq!(
        (oversized.status, oversized.error()),
        (413, "too_large".into())
    );
    let ahead = api.post(
        init,
        Some(access),
        &json!({ "device_id": "x", "app_version": "1.2.0", "last_sync": 99 }),
    );
    assert_eq!((ahead.status, ahead.error()), (409, "cursor_ahead".into()));
    let bad_query = api.get("/api/sync/download?since=minus-one", access, &[]);
    assert_eq!(bad_query.status, 400);
    let nowhere = api.get("/api/nowhere", access, &[]);
    assert_eq!(nowhere.status, 404);
    api.check_against_spec();
}

#[test]
fn a_download_cursor_below_the_compaction_horizon_is_gone() {
    let home = tempfile::tempdir().expect("temp dir");
    // The relay keeps the last entry of a log, compacting every second.
    let relay = start_relay_with(
        &home.path().join("relay"),
        "keep_log_entries = 1\ncompact_interval_secs = 1\n",
    );
    let api = Api::new(&relay);
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("token");
    let me = tokens["device"].as_str().expect("client id");
    let written = api.post(
        "/api/sync/upload",
        Some(access),
        &json!([
            op("create", "Customer", "c1", json!({ "name": "Ada" }), me),
            op("create", "Customer", "c2", json!({ "name": "Bo" }), me),
            op("create", "Customer", "c3", json!({ "name": "Cy" }), me),
        ]),
    );
    assert_eq!(written.status, 200, "{}", written.json());
    let gone = wait_for_ok("the log to be compacted to 2", TIMEOUT, || {
        let answer = api.get("/api/sync/download?since=1", access, &[]);
        match answer.status {
            410 => Ok(answer),
            other => Err(format!("{other}: {}", answer.json())),
        }
    });
    assert_eq!(gone.error(), "compacted");
    assert!(gone.says("since=2"), "{}", gone.json());
    let rest = api.get("/api/sync/download?since=2", access, &[]);
    assert_eq!(rest.status, 200);
    let ids: Vec<Value> = rest.json()["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(ids, [json!("c3")]);
    api.check_against_spec();
}

#[test]
fn refresh_rotates_reuse_revokes_and_a_revoked_client_is_refused() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);
    let first = api.login("default");
    let refresh = |token: &Value| {
        api.post(
            "/api/auth/refresh",
            None,
            &json!({ "refresh_token": token.as_str().expect("refresh token") }),
        )
    };
    let second = refresh(&first["refresh_token"]);
    assert_eq!(second.status, 200);
    let second = second.json();
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let access = second["access_token"].as_str().expect("token").to_string();
    let download = |token: &str| api.get("/api/sync/download", token, &[]).status;
    assert_eq!(download(&access), 200);

    // The first refresh token again: refused, and its whole family with it.
    let reused = refresh(&first["refresh_token"]);
    assert_eq!(reused.status, 401);
    assert_eq!(
        download(&access),
        401,
        "the family's access token is revoked too"
    );
    assert_eq!(refresh(&second["refresh_token"]).status, 401);
    assert!(relay.log().contains("reason=\"reused\""));

    // A web client is listed with the devices, and revoking it cuts it off.
    let third = api.login("default");
    let web = third["device"].as_str().expect("device").to_string();
    let listed = relay
        .operator()
        .ferry(&["--json", "relay", "devices", "--account", "default"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert!(listed.as_array().is_some_and(|d| {
        d.iter()
            .any(|d| d["device"] == web.as_str() && d["kind"] == "web")
    }));
    assert!(
        relay
            .operator()
            .ferry(&["relay", "revoke", &web])
            .status
            .success()
    );
    let access = third["access_token"].as_str().expect("token");
    assert_eq!(download(access), 403);
    api.check_against_spec();
}

#[test]
fn metrics_are_served_to_a_scraper_with_the_token_only() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);
    let device = Device::new();
    device.join(&relay);
    let refused = api.get("/metrics", "wrong-token", &[]);
    assert_eq!(refused.status, 401);
    let scraped = api.get("/metrics", "scrape-token-for-tests", &[]);
    assert_eq!(scraped.status, 200);
    assert_eq!(
        scraped.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(scraped.body).expect("text");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ferry_relay_sign_ins_total{result=\"ok\"} ")),
        "the registration's sign-in is counted:\n{text}"
    );
    api.check_against_spec();
}

#[test]
fn the_openapi_file_is_valid_json_that_names_every_route_the_relay_serves() {
    let spec = openapi();
    assert_eq!(spec["openapi"], "3.1.0");
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);
    let paths = spec["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 21);
    for (template, operations) in paths {
        let path = template.replace(['{', '}'], "");
        for method in operations.as_object().expect("operations").keys() {
            // Without a token or a body, each route answers its own error, never the fallback.
            let answer = api.send(&method.to_uppercase(), &path, &[], Vec::new());
            assert_ne!(
                answer.status, 404,
                "{method} {path} is in the spec but not served"
            );
        }
    }
    // And the schemas check what they say: a page missing `records` does not conform.
    let page = json!({ "since": 0, "through": 0, "head": 0, "next": null });
    let schema = json!({ "$ref": "#/components/schemas/DownloadPage" });
    assert!(conforms(&spec, &schema, &page, "$").is_err());
    api.check_against_spec();
}

/// The HTTP error codes are pinned: clients match on them, so renaming one, or sending it with
/// another status, breaks this test. docs/HTTP.md's table and docs/openapi.json list exactly
/// these.
#[test]
fn http_error_codes_are_pinned_and_documented() {
    // Exhaustive: a new code fails to compile here until it is pinned.
    fn pinned(code: ErrorCode) -> (&'static str, u16) {
        match code {
            ErrorCode::BadRequest => ("bad_request", 400),
            ErrorCode::Unauthorized => ("unauthorized", 401),
            ErrorCode::Forbidden => ("forbidden", 403),
            ErrorCode::NotFound => ("not_found", 404),
            ErrorCode::CursorAhead => ("cursor_ahead", 409),
            ErrorCode::Compacted => ("compacted", 410),
            ErrorCode::Settled => ("settled", 409),
            ErrorCode::TooLarge => ("too_large", 413),
            ErrorCode::RateLimited => ("rate_limited", 429),
            ErrorCode::Unavailable => ("unavailable", 503),
        }
    }
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/HTTP.md"))
        .expect("docs/HTTP.md");
    let documented: Vec<(u16, String)> = doc
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let status = cells.get(1)?.parse().ok()?;
            let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((status, code.to_owned()))
        })
        .collect();
    let spec = openapi();
    let spec_codes = &spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
        ["enum"];
    let mut expected = Vec::new();
    for code in ErrorCode::ALL {
        let (name, status) = pinned(code);
        assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
        assert_eq!(
            serde_json::from_value::<ErrorCode>(json!(name)).unwrap(),
            code
        );
        assert_eq!(code.status().as_u16(), status, "{name}");
        expected.push((status, name.to_owned()));
    }
    assert_eq!(documented, expected, "docs/HTTP.md's error table");
    let names: Vec<&str> = expected.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(
        spec_codes,
        &json!(names),
        "docs/openapi.json's Error.code enum"
    );
}

/// The codes of rejected upload operations are pinned the same way: each is in docs/HTTP.md's
/// list of rejection codes, and docs/openapi.json's WriteResult.code enum holds exactly these
/// and the kinds of the log's refusals.
#[test]
fn upload_rejection_codes_are_pinned_and_documented() {
    // Exhaustive: a new code fails to compile here until it is pinned.
    fn pinned(code: RejectCode) -> &'static str {
        match code {
            RejectCode::WrongDevice => "wrong_device",
            RejectCode::BadTimestamp => "bad_timestamp",
            RejectCode::BadVersion => "bad_version",
            RejectCode::UnknownModel => "unknown_model",
            RejectCode::EncryptedField => "encrypted_field",
            RejectCode::Exists => "exists",
            RejectCode::NotFound => "not_found",
            RejectCode::Invalid => "invalid",
            RejectCode::Log(kind) => match kind {
                ErrorKind::Network => "network",
                ErrorKind::Authentication => "authentication",
                ErrorKind::Validation => "validation",
                ErrorKind::Server => "server",
                ErrorKind::Timeout => "timeout",
            },
        }
    }
    let own = [
        RejectCode::WrongDevice,
        RejectCode::BadTimestamp,
        RejectCode::BadVersion,
        RejectCode::UnknownModel,
        RejectCode::EncryptedField,
        RejectCode::Exists,
        RejectCode::NotFound,
        RejectCode::Invalid,
    ];
    let kinds = [
        ErrorKind::Network,
        ErrorKind::Authentication,
        ErrorKind::Validation,
        ErrorKind::Server,
        ErrorKind::Timeout,
    ];
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/HTTP.md"))
        .expect("docs/HTTP.md");
    let listed = doc
        .split("Rejection\ncodes:")
        .nth(1)
        .or_else(|| doc.split("Rejection codes:").nth(1))
        .and_then(|rest| rest.split("\n\n").next())
        .expect("docs/HTTP.md lists the rejection codes")
        .replace('\n', " ");
    let mut names = Vec::new();
    for code in own.into_iter().chain(kinds.map(RejectCode::Log)) {
        let name = pinned(code);
        assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
        assert_eq!(
            serde_json::from_value::<RejectCode>(json!(name)).unwrap(),
            code
        );
        names.push(name);
    }
    for code in own {
        let name = pinned(code);
        assert!(
            listed.contains(&format!("`{name}`")),
            "docs/HTTP.md lists {name}"
        );
    }
    let spec = openapi();
    let spec_codes = &spec["components"]["schemas"]["WriteResult"]["properties"]["code"]["enum"];
    assert_eq!(
        spec_codes,
        &json!(names),
        "docs/openapi.json's WriteResult.code enum"
    );
}

/// An upload operation made now by `device`.
fn op(operation: &str, model: &str, id: &str, data: Value, device: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    json!({ "operation": operation, "model": model, "object_id": id, "data": data,
            "timestamp": now, "device_id": device })
}

/// The `(object_id, status, code)` of each upload result, in order.
fn statuses(answer: &Answer) -> Vec<(String, String, String)> {
    assert_eq!(answer.status, 200, "{}", answer.json());
    answer.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (text("object_id"), text("status"), text("code"))
        })
        .collect()
}

/// The record as the daemon shows it, or `None` when it does not exist (or is deleted).
fn daemon_get(daemon: &common::Daemon, collection: &str, id: &str) -> Option<Value> {
    daemon
        .client()
        .call("get", json!({ "collection": collection, "id": id }))
        .ok()
        .map(|r| r["fields"].clone())
}

#[test]
fn http_writes_reach_a_live_daemon_and_each_bad_operation_is_rejected_alone() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay_with(&home.path().join("relay"), COLLECTIONS);
    let api = Api::new(&relay);
    let device = Device::new();
    device.join(&relay);
    let daemon = device.start_daemon_logged();
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("token");
    let me = tokens["device"].as_str().expect("client id");

    let mut stale = op("create", "Customer", "c3", json!({ "name": "Old" }), me);
    stale["timestamp"] = json!(5);
    let answer = api.post(
        "/api/sync/upload",
        Some(access),
        &json!([
            op("create", "Customer", "c1", json!({ "name": "Ada" }), me),
            op("update", "Customer", "c1", json!({ "tier": "gold" }), me),
            op("create", "Customer", "c1", json!({ "name": "Again" }), me),
            op("delete", "Customer", "missing", Value::Null, me),
            op("update", "Customer", "missing", json!({ "name": "x" }), me),
            op("create", "Planet", "p1", json!({ "name": "Mars" }), me),
            op("create", "Vault", "v1", json!({ "pin": "1234" }), me),
            op(
                "create",
                "Customer",
                "c2",
                json!({ "name": "Bo" }),
                "someone-else"
            ),
            stale,
            op(
                "create",
                "Customer",
                "bad\u{1}id",
                json!({ "name": "x" }),
                me
            ),
            op("create", "Customer", "c4", json!({ "name": "Cy" }), me),
        ]),
    );
    let expected: Vec<(String, String, String)> = [
        ("c1", "applied", ""),
        ("c1", "applied", ""),
        ("c1", "rejected", "exists"),
        ("missing", "rejected", "not_found"),
        ("missing", "rejected", "not_found"),
        ("p1", "rejected", "unknown_model"),
        ("v1", "rejected", "encrypted_field"),
        ("c2", "rejected", "wrong_device"),
        ("c3", "rejected", "bad_timestamp"),
        ("bad\u{1}id", "rejected", "invalid"),
        ("c4", "applied", ""),
    ]
    .iter()
    .map(|(id, status, code)| (id.to_string(), status.to_string(), code.to_string()))
    .collect();
    assert_eq!(statuses(&answer), expected, "{}", answer.json());
    let results = answer.json()["results"].clone();
    assert!(
        results[9]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("record id")),
        "a rejection says what is wrong: {}",
        results[9]
    );

    // The daemon was live: the writes reach it without it asking.
    common::wait_for(
        "the HTTP writes to reach the daemon",
        common::TIMEOUT,
        || {
            daemon_get(&daemon, "Customer", "c1") == Some(json!({ "name": "Ada", "tier": "gold" }))
                && daemon_get(&daemon, "Customer", "c4").is_some()
        },
    );
    // The version an upload answers is the one download shows.
    let page = api.get("/api/sync/download?since=0", access, &[]).json();
    let c1 = page["records"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["id"] == "c1"))
        .expect("c1 in the download")
        .clone();
    assert_eq!(c1["version"], results[1]["version"]);
    assert_eq!(
        c1["version"].as_str(),
        c1["heads"]
            .as_array()
            .map(|h| h
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","))
            .as_deref()
    );

    // A daemon's write and an HTTP delete meet in the log like two devices' changes.
    call(
        &daemon,
        "patch",
        json!({ "collection": "Customer", "id": "c4", "fields": { "tier": "silver" } }),
    );
    common::wait_for(
        "the daemon's write to reach the relay",
        common::TIMEOUT,
        || common::unsent(&common::status(&daemon)) == 0,
    );
    let deleted = api.post(
        "/api/sync/upload",
        Some(access),
        &json!([op("delete", "Customer", "c4", Value::Null, me)]),
    );
    assert_eq!(
        statuses(&deleted),
        vec![("c4".to_string(), "applied".to_string(), String::new())]
    );
    common::wait_for(
        "the HTTP delete to reach the daemon",
        common::TIMEOUT,
        || daemon_get(&daemon, "Customer", "c4").is_none(),
    );
    api.check_against_spec();
}

#[test]
fn write_and_conflict_routes_refuse_bad_requests_with_their_status() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay_with(&home.path().join("relay"), COLLECTIONS);
    let api = Api::new(&relay);
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("token");
    let me = tokens["device"].as_str().expect("client id");
    let upload = "/api/sync/upload";
    let bearer = format!("Bearer {access}");

    let not_json = api.send(
        "POST",
        upload,
        &[("authorization", &bearer)],
        b"[{oops".to_vec(),
    );
    assert_eq!(
        (not_json.status, not_json.error()),
        (400, "bad_request".into())
    );
    let message = |a: &Answer| {
        a.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        message(&not_json).contains("not valid JSON"),
        "{}",
        message(&not_json)
    );
    let object = api.post(upload, Some(access), &json!({ "operations": [] }));
    assert_eq!(object.status, 400);
    let mut no_time = op("create", "Customer", "c1", json!({}), me);
    no_time.as_object_mut().expect("object").remove("timestamp");
    let missing = api.post(upload, Some(access), &json!([no_time]));
    assert_eq!(missing.status, 400);
    assert!(
        message(&missing).contains("timestamp"),
        "{}",
        message(&missing)
    );
    let mut wrong = op("create", "Customer", "c1", json!({}), me);
    wrong["timestamp"] = json!("soon");
    let wrong_type = api.post(upload, Some(access), &json!([wrong]));
    assert_eq!(wrong_type.status, 400);
    assert!(
        message(&wrong_type).contains("[0].timestamp"),
        "{}",
        message(&wrong_type)
    );
    let upsert = api.post(
        upload,
        Some(access),
        &json!([op("upsert", "Customer", "c1", json!({}), me)]),
    );
    assert_eq!(upsert.status, 400);
    let no_data = api.post(
        upload,
        Some(access),
        &json!([op("update", "Customer", "c1", Value::Null, me)]),
    );
    assert_eq!(no_data.status, 400);
    assert!(message(&no_data).contains("data"), "{}", message(&no_data));
    let oversized = api.post(
        upload,
        Some(access),
        &json!([op(
            "create",
            "Customer",
            "c1",
            json!({ "note": "x".repeat(70_000) }),
            me
        )]),
    );
    assert_eq!(
        (oversized.status, oversized.error()),
        (413, "too_large".into())
    );
    assert_eq!(api.post(upload, None, &json!([])).status, 401);
    assert_eq!(
        api.post(upload, Some("not.a.token"), &json!([])).status,
        401
    );
    // Nothing above was written.
    let empty = api.get("/api/sync/download?since=0", access, &[]).json();
    assert_eq!(empty["head"], 0);

    assert_eq!(
        api.get("/api/conflicts?status=bogus", access, &[]).status,
        400
    );
    assert_eq!(api.get("/api/conflicts?limit=0", access, &[]).status, 400);
    assert_eq!(
        api.get("/api/conflicts?limit=many", access, &[]).status,
        400
    );
    let listed = api.get("/api/conflicts?status=all", access, &[]);
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json(), json!({ "conflicts": [], "next": null }));
    let unknown = api.get("/api/conflicts/c0ffee", access, &[]);
    assert_eq!((unknown.status, unknown.error()), (404, "not_found".into()));
    let resolve = "/api/sync/resolve-conflict";
    let nowhere = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": "c0ffee", "resolution": "server" }),
    );
    assert_eq!(nowhere.status, 404);
    let mine = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": "c0ffee", "resolution": "mine" }),
    );
    assert_eq!(mine.status, 400);
    assert_eq!(
        api.get("/api/conflicts", "not.a.token", &[]).status,
        401,
        "conflicts need a token too"
    );
    api.check_against_spec();
}

#[test]
fn an_http_client_and_two_daemons_edit_the_same_records_and_converge() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay_with(&home.path().join("relay"), COLLECTIONS);
    let api = Api::new(&relay);
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("token");
    let me = tokens["device"].as_str().expect("client id");
    let (a, b) = (Device::new(), Device::new());
    for device in [&a, &b] {
        device.manual_collection("Task");
        device.join(&relay);
    }
    let daemon_a = a.start_daemon_logged();
    let daemon_b = b.start_daemon_logged();
    let upload = |ops: Value| statuses(&api.post("/api/sync/upload", Some(access), &ops));
    let applied = |id: &str| vec![(id.to_string(), "applied".to_string(), String::new())];

    assert_eq!(
        upload(json!([
            op(
                "create",
                "Task",
                "t1",
                json!({ "title": "draft", "done": false }),
                me
            ),
            op("create", "Customer", "c1", json!({ "name": "Ada" }), me),
        ])),
        [applied("t1"), applied("c1")].concat()
    );
    common::wait_for("the HTTP creates on daemon A", common::TIMEOUT, || {
        daemon_get(&daemon_a, "Customer", "c1").is_some()
    });
    // Merge collection: a daemon and the HTTP client set different fields at once.
    call(
        &daemon_a,
        "patch",
        json!({ "collection": "Customer", "id": "c1", "fields": { "name": "Ada L" } }),
    );
    assert_eq!(
        upload(json!([op(
            "update",
            "Customer",
            "c1",
            json!({ "tier": "gold" }),
            me
        )])),
        applied("c1")
    );
    for daemon in [&daemon_a, &daemon_b] {
        common::wait_for("both edits of c1 on every daemon", common::TIMEOUT, || {
            daemon_get(daemon, "Customer", "c1") == Some(json!({ "name": "Ada L", "tier": "gold" }))
                && daemon_get(daemon, "Task", "t1").is_some()
        });
    }

    // Manual collection: B edits offline while the HTTP client edits the same field.
    assert!(daemon_b.terminate().success());
    let offline = b.ferry(&["patch", "Task/t1", "--data", r#"{"title":"from B"}"#]);
    assert!(offline.status.success(), "{}", common::stderr(&offline));
    assert_eq!(
        upload(json!([op(
            "update",
            "Task",
            "t1",
            json!({ "title": "from the web" }),
            me
        )])),
        applied("t1")
    );
    let daemon_b = b.start_daemon_logged();
    let conflict = common::wait_for_ok("the conflict listed over HTTP", common::TIMEOUT, || {
        let listed = api.get("/api/conflicts", access, &[]).json();
        match listed["conflicts"].as_array().map(Vec::as_slice) {
            Some([one]) => Ok(one.clone()),
            _ => Err(listed.to_string()),
        }
    });
    let id = conflict["id"].as_str().expect("conflict id").to_string();
    assert_eq!(
        (&conflict["record"], &conflict["status"]),
        (&json!("t1"), &json!("open"))
    );
    // Every device holds the same conflict under the same id.
    for daemon in [&daemon_a, &daemon_b] {
        common::wait_for("the conflict on each daemon", common::TIMEOUT, || {
            daemon
                .client()
                .call("conflicts.get", json!({ "id": id }))
                .is_ok_and(|c| c["status"] == "open")
        });
    }
    let one = api.get(&format!("/api/conflicts/{id}"), access, &[]);
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], id.as_str());

    // Another account: the same answer as an id that does not exist.
    let other = api.login("other");
    let theirs = other["access_token"].as_str().expect("token");
    assert_eq!(
        api.get(&format!("/api/conflicts/{id}"), theirs, &[]).status,
        404
    );
    let resolve = "/api/sync/resolve-conflict";
    let foreign = api.post(
        resolve,
        Some(theirs),
        &json!({ "conflict_id": id, "resolution": "server" }),
    );
    assert_eq!((foreign.status, foreign.error()), (404, "not_found".into()));

    let no_data = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": id, "resolution": "merge" }),
    );
    assert_eq!(no_data.status, 400);
    let resolved = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": id, "resolution": "merge",
                 "resolved_data": { "title": "agreed" } }),
    );
    assert_eq!(resolved.status, 200, "{}", resolved.json());
    let resolved = resolved.json();
    assert_eq!(resolved["conflict"]["status"], "resolved");
    assert_eq!(resolved["writes"][0]["id"], "t1");
    let again = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": id, "resolution": "client" }),
    );
    assert_eq!((again.status, again.error()), (409, "settled".into()));

    for daemon in [&daemon_a, &daemon_b] {
        common::wait_for("the resolution on each daemon", common::TIMEOUT, || {
            daemon_get(daemon, "Task", "t1").is_some_and(|t| t["title"] == "agreed")
                && daemon
                    .client()
                    .call("conflicts.get", json!({ "id": id }))
                    .is_ok_and(|c| c["status"] == "resolved")
        });
    }

    // An update made on an older version meets the change made since like an offline edit.
    let version = resolved["writes"][0]["version"].clone();
    call(
        &daemon_a,
        "patch",
        json!({ "collection": "Task", "id": "t1", "fields": { "title": "A's" } }),
    );
    common::wait_for("A's edit to reach the relay", common::TIMEOUT, || {
        common::unsent(&common::status(&daemon_a)) == 0
    });
    let mut late = op("update", "Task", "t1", json!({ "title": "the web's" }), me);
    late["base"] = version;
    let mut bad_base = op("update", "Task", "t1", json!({ "title": "x" }), me);
    bad_base["base"] = json!("not-a-version");
    let mut unknown_base = op("update", "Task", "t1", json!({ "title": "x" }), me);
    unknown_base["base"] = json!("00".repeat(32));
    let mut create_at = op("create", "Task", "t2", json!({ "title": "x" }), me);
    create_at["base"] = json!("00".repeat(32));
    let answer = api.post(
        "/api/sync/upload",
        Some(access),
        &json!([late, bad_base, unknown_base, create_at]),
    );
    let codes: Vec<(String, String)> = statuses(&answer)
        .into_iter()
        .map(|(_, status, code)| (status, code))
        .collect();
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        codes,
        vec![
            pair("conflict", ""),
            pair("rejected", "bad_version"),
            pair("rejected", "invalid"),
            pair("rejected", "invalid"),
        ],
        "{}",
        answer.json()
    );
    let second = answer.json()["results"][0]["conflict_id"]
        .as_str()
        .expect("conflict id")
        .to_string();
    let listed = api.get("/api/conflicts", access, &[]).json();
    assert_eq!(listed["conflicts"][0]["id"], second.as_str());
    for daemon in [&daemon_a, &daemon_b] {
        common::wait_for(
            "the second conflict on each daemon",
            common::TIMEOUT,
            || {
                daemon
                    .client()
                    .call("conflicts.get", json!({ "id": second }))
                    .is_ok_and(|c| c["status"] == "open")
            },
        );
    }
    let kept = api.post(
        resolve,
        Some(access),
        &json!({ "conflict_id": second, "resolution": "server" }),
    );
    assert_eq!(kept.status, 200, "{}", kept.json());
    for daemon in [&daemon_a, &daemon_b] {
        common::wait_for(
            "the relay's first version kept everywhere",
            common::TIMEOUT,
            || {
                daemon_get(daemon, "Task", "t1").is_some_and(|t| t["title"] == "A's")
                    && daemon
                        .client()
                        .call("conflicts.get", json!({ "id": second }))
                        .is_ok_and(|c| c["status"] == "resolved")
            },
        );
    }
    let head = api
        .post(
            "/api/sync/initialize",
            Some(access),
            &json!({ "device_id": "web", "app_version": "1.3.0" }),
        )
        .json()["cursor"]
        .as_u64()
        .expect("cursor");
    wait_converged(&[&daemon_a, &daemon_b], head);
    let open = api.get("/api/conflicts", access, &[]).json();
    assert_eq!(open["conflicts"], json!([]));
    api.check_against_spec();
}

/// An open `GET /api/events` stream.
struct Events<'a> {
    api: &'a Api,
    body: hyper::body::Incoming,
    buffer: String,
}

impl Events<'_> {
    /// The next event's name and data, waiting at most 20 s; comments (keep-alives) skipped.
    fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !name.is_empty() {
                    return (
                        name,
                        serde_json::from_str(&data).expect("event data is JSON"),
                    );
                }
                continue;
            }
            let frame = self.api.runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(20), self.body.frame())
                    .await
                    .expect("an event within 20 s")
            });
            let frame = frame.expect("the stream is open").expect("a frame");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }
}

impl Api {
    fn events(&self, token: &str) -> Events<'_> {
        let body = self.runtime.block_on(async {
            let mut sender = common::https_connect(&self.addr, self.tls.clone()).await;
            let request = hyper::Request::builder()
                .uri("/api/events")
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            assert_eq!(response.status(), 200);
            assert_eq!(
                response.headers()["content-type"],
                "text/event-stream",
                "an event stream"
            );
            response.into_body()
        });
        Events {
            api: self,
            body,
            buffer: String::new(),
        }
    }
}

#[test]
fn web_routes_show_records_history_devices_the_sync_log_and_stream_changes() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay(&home.path().join("relay"));
    let api = Api::new(&relay);
    let device = Device::new();
    device.join(&relay);
    let daemon = device.start_daemon_logged();
    let device_id = common::status(&daemon)["device_id"]
        .as_str()
        .expect("device id")
        .to_string();
    call(
        &daemon,
        "put",
        json!({ "collection": "Customer", "id": "c1", "fields": { "name": "Ada" } }),
    );
    call(
        &daemon,
        "patch",
        json!({ "collection": "Customer", "id": "c1", "fields": { "city": "Paris" } }),
    );
    call(
        &daemon,
        "put",
        json!({ "collection": "Customer", "id": "c2", "fields": { "name": "Bo" } }),
    );
    wait_converged(&[&daemon], 3);
    let tokens = api.login("default");
    let access = tokens["access_token"].as_str().expect("access token");
    let web_id = tokens["device"].as_str().expect("web client id");
    let other = api.login("other");
    let other_access = other["access_token"].as_str().expect("access token");

    // The page and its files, with a policy that runs no inline or foreign code.
    let page = api.send("GET", "/", &[], Vec::new());
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap_or("")
            .starts_with("text/html")
    );
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(String::from_utf8_lossy(&page.body).contains("/ui/app.js"));
    for asset in ["/ui/app.js", "/ui/style.css"] {
        assert_eq!(
            api.send("GET", asset, &[], Vec::new()).status,
            200,
            "{asset}"
        );
    }

    let collections = api.get("/api/collections", access, &[]).json();
    assert_eq!(
        collections["collections"],
        json!([{ "name": "Customer", "records": 2, "strategy": "merge" }])
    );
    assert_eq!(
        api.get("/api/collections", other_access, &[]).json()["collections"],
        json!([]),
        "another account has none of them"
    );

    // Pages by id.
    let first = api
        .get("/api/records?collection=Customer&limit=1", access, &[])
        .json();
    assert_eq!(first["records"][0]["id"], "c1");
    assert_eq!(
        first["records"][0]["fields"],
        json!({ "name": "Ada", "city": "Paris" })
    );
    assert_eq!(first["next"], "c1");
    let second = api
        .get(
            "/api/records?collection=Customer&limit=1&after=c1",
            access,
            &[],
        )
        .json();
    assert_eq!(second["records"][0]["id"], "c2");
    let last = api
        .get(
            "/api/records?collection=Customer&limit=5&after=c2",
            access,
            &[],
        )
        .json();
    assert_eq!(
        (last["records"].clone(), last["next"].clone()),
        (json!([]), Value::Null)
    );
    let missing_collection = api.get("/api/records", access, &[]);
    assert_eq!(missing_collection.status, 400);
    assert!(
        missing_collection.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("collection")
    );

    // One record with its history: who wrote what, in order.
    let one = api.get("/api/records/Customer/c1", access, &[]).json();
    assert_eq!(one["record"]["fields"]["city"], "Paris");
    let history = one["history"].as_array().expect("history");
    let operations: Vec<&str> = history
        .iter()
        .map(|c| c["operation"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(operations, ["create", "update"]);
    assert!(history.iter().all(|c| c["device"] == device_id.as_str()));
    assert_eq!(history[1]["fields"], json!(["city"]));
    for (token, path) in [
        (access, "/api/records/Customer/nope"),
        (other_access, "/api/records/Customer/c1"),
    ] {
        let answer = api.get(path, token, &[]);
        assert_eq!(
            (answer.status, answer.error()),
            (404, "not_found".into()),
            "{path}"
        );
    }

    // Devices: the daemon with its last sync and nothing pending, and this browser.
    common::wait_for(
        "the daemon's sync shown",
        std::time::Duration::from_secs(20),
        || {
            let devices = api.get("/api/devices", access, &[]).json();
            devices["devices"].as_array().is_some_and(|all| {
                all.iter().any(|d| {
                    d["id"] == device_id.as_str()
                        && d["kind"] == "device"
                        && d["last_sync_ms"].is_u64()
                        && d["pending"] == 0
                }) && all
                    .iter()
                    .any(|d| d["id"] == web_id && d["current"] == true)
            })
        },
    );
    let other_devices = api.get("/api/devices", other_access, &[]).json();
    assert!(
        other_devices["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .all(|d| d["id"] != device_id.as_str()),
        "{other_devices}"
    );

    // The sync log names the daemon's uploads; the minute totals count its changes.
    let log = api.get("/api/sync-log?limit=100", access, &[]).json();
    let uploaded: u64 = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "upload" && e["device"] == device_id.as_str())
        .map(|e| e["changes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(uploaded, 3, "{log}");
    let stats = api.get("/api/stats?minutes=10", access, &[]).json();
    let up: u64 = stats["minutes"]
        .as_array()
        .expect("minutes")
        .iter()
        .map(|m| m["changes_up"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(up, 3, "{stats}");
    assert_eq!(api.get("/api/sync-log?limit=x", access, &[]).status, 400);
    assert_eq!(
        api.get("/api/sync-log", other_access, &[]).json()["entries"],
        json!([])
    );

    // Live: a write on the daemon reaches an open event stream, naming the record.
    let mut events = api.events(access);
    let (name, hello) = events.next();
    assert_eq!((name.as_str(), hello["head"].as_u64()), ("hello", Some(3)));
    call(
        &daemon,
        "put",
        json!({ "collection": "Invoice", "id": "i1", "fields": { "total": 12 } }),
    );
    let (name, change) = events.next();
    assert_eq!(name, "change");
    assert_eq!(
        change,
        json!({ "head": 4, "records": [{ "seq": 4, "collection": "Invoice", "id": "i1" }], "more": false })
    );

    // Revoking: not another account's device; this account's daemon is cut off.
    let foreign = api.post(
        &format!("/api/devices/{device_id}/revoke"),
        Some(other_access),
        &json!({}),
    );
    assert_eq!((foreign.status, foreign.error()), (404, "not_found".into()));
    let revoked = api.post(
        &format!("/api/devices/{device_id}/revoke"),
        Some(access),
        &json!({}),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.json());
    assert!(revoked.json()["device"]["revoked_ms"].is_u64());
    common::wait_for(
        "the daemon cut off",
        std::time::Duration::from_secs(20),
        || {
            let error = &common::status(&daemon)["sync"]["last_error"];
            error["kind"] == "authentication" && error.to_string().contains("revoked")
        },
    );
    api.check_against_spec();
}

#[test]
fn an_expired_access_token_is_refused_on_every_route_and_its_refresh_token_renews_it() {
    let home = tempfile::tempdir().expect("temp dir");
    let dir = home.path().join("relay");
    let mut relay = start_relay(&dir);
    relay.kill();
    // Tokens issued two hours ago, by the relay's own accounts and signing key: the access token
    // expired long ago (and past the allowed skew), the refresh token has weeks left.
    let issued_at = ferry::clock::now_ms() - 2 * 3_600_000;
    let tokens = {
        let kv: Arc<dyn ferry::store::kv::Kv> = Arc::new(
            ferry::store::kv::SledKv::open(&dir.join("relay.db"), 8 << 20).expect("relay.db"),
        );
        let accounts = ferry::relay::accounts::Accounts::open(
            Arc::new(ferry::relay::storage::KvStorage::new(kv)),
            ferry::auth::token::TokenPolicy::default(),
            ferry::relay::accounts::os_random(),
            issued_at,
        )
        .expect("accounts");
        accounts
            .login(
                "default",
                &ferry_proto::wire::Secret::new(PASSWORD.to_string()),
                "stale",
                issued_at,
            )
            .expect("login")
            .1
    };
    let relay = Relay::start(&dir, None);
    let api = Api::new(&relay);
    let expired = tokens.access.expose();
    for path in [
        "/api/collections",
        "/api/records?collection=Customer",
        "/api/devices",
        "/api/sync-log",
        "/api/stats",
        "/api/events",
        "/api/sync/download",
    ] {
        let answer = api.get(path, expired, &[]);
        assert_eq!(
            (answer.status, answer.error()),
            (401, "unauthorized".into()),
            "{path}"
        );
        assert!(answer.says("expired"), "{path}: {}", answer.json());
    }
    let renewed = api.post(
        "/api/auth/refresh",
        None,
        &json!({ "refresh_token": tokens.refresh.expose() }),
    );
    assert_eq!(renewed.status, 200, "{}", renewed.json());
    let fresh = renewed.json()["access_token"]
        .as_str()
        .expect("access token")
        .to_string();
    assert_eq!(api.get("/api/collections", &fresh, &[]).status, 200);
    api.check_against_spec();
}

#[test]
fn an_account_over_its_quota_sees_the_alert_and_another_account_does_not() {
    let home = tempfile::tempdir().expect("temp dir");
    let relay = start_relay_with(
        &home.path().join("relay"),
        "[alerts]\naccount_quota_bytes = 600\nmin_disk_free_mb = 0\n",
    );
    let api = Api::new(&relay);
    let access = api.login("default")["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let other = api.login("other")["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(
        api.get("/api/alerts", &access, &[]).json()["alerts"],
        json!([])
    );

    let device = Device::new();
    device.join(&relay);
    let daemon = device.start_daemon_logged();
    for n in 0..5 {
        call(
            &daemon,
            "put",
            json!({ "collection": "Customer", "id": format!("c{n}"), "fields": { "note": "x".repeat(200) } }),
        );
    }
    wait_converged(&[&daemon], 5);
    let alerts = common::wait_for_ok(
        "the quota alert",
        std::time::Duration::from_secs(20),
        || {
            let alerts = api.get("/api/alerts", &access, &[]).json();
            if alerts["alerts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["kind"] == "storage_quota"))
            {
                Ok(alerts)
            } else {
                Err(alerts.to_string())
            }
        },
    );
    let quota = &alerts["alerts"][0];
    assert_eq!(quota["threshold"], 600.0);
    assert!(
        quota["value"].as_f64().is_some_and(|v| v > 600.0),
        "{quota}"
    );
    assert_eq!(
        api.get("/api/alerts", &other, &[]).json()["alerts"],
        json!([])
    );
    api.check_against_spec();
}
