//! The relay's HTTPS API against a real relay process (TLS 1.3, its pinned certificate) and real
//! daemons: password sign-in as a web client, token refresh and reuse, `initialize`, `download`
//! with pages, ETag/304 and gzip, and every kind of bad request getting its status and a
//! message that names the problem. Another account's token sees none of this account's records.

mod common;

use common::{Device, Relay, call, wait_converged};
use ferry::transport::{Fingerprint, ServerTrust, client_tls};
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
        let fingerprint: Fingerprint = relay.fingerprint.parse().expect("fingerprint");
        let mut tls = client_tls(&ServerTrust::Pinned(fingerprint)).expect("tls");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Api {
            addr: relay.http.clone().expect("the relay serves HTTPS"),
            tls: Arc::new(tls),
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
            let Some(operation) = spec["paths"][path.as_str()].get(method.to_lowercase()) else {
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
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .expect("connect");
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let stream = connector.connect(name, tcp).await.expect("TLS");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("HTTP handshake");
            tokio::spawn(connection);
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

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
        .expect("docs/openapi.json is JSON")
}

/// Whether `value` fits `schema`, for the part of JSON Schema the spec uses: `$ref`, `type`
/// (one or several), `required`, `properties`, `additionalProperties: false`, `items`.
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
    let relay = Relay::start_with_config(
        dir,
        None,
        "[relay]\nhttp_listen = \"127.0.0.1:0\"\nhttp_max_body_bytes = 65536\nhttp_max_page = 50\n\
         min_app_version = \"1.2.0\"\nlogins_per_minute = 1000\nenrolments_per_minute = 1000\n\
         metrics_token = \"scrape-token-for-tests\"\n",
    );
    for account in ["default", "other"] {
        relay.operator().add_account(account);
        let out = relay
            .operator()
            .command(&["relay", "account", "password", account])
            .env("FERRY_PASSWORD", PASSWORD)
            .output()
            .expect("ferry relay account password");
        assert!(out.status.success(), "setting the password: {out:?}");
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
    assert!(
        not_json.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not valid JSON"))
    );
    let missing = api.post(init, Some(access), &json!({ "device_id": "x" }));
    assert_eq!(missing.status, 400);
    assert!(
        missing.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("app_version")),
        "{}",
        missing.json()
    );
    let wrong_type = api.post(
        init,
        Some(access),
        &json!({ "device_id": "x", "app_version": "1.2.0", "last_sync": "yesterday" }),
    );
    assert_eq!(wrong_type.status, 400);
    assert!(
        wrong_type.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("last_sync")),
        "{}",
        wrong_type.json()
    );
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
    assert_eq!(paths.len(), 5);
    for (path, operations) in paths {
        for method in operations.as_object().expect("operations").keys() {
            // Without a token or a body, each route answers its own error, never the fallback.
            let answer = api.send(&method.to_uppercase(), path, &[], Vec::new());
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
