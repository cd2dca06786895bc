//! Accounts and tokens through the real relay process (`ferry relay`), real daemons and raw
//! protocol clients: accounts never see, change or hear about each other's records whatever
//! ids they use; naming another account's space tells nothing; a revoked device is cut off at
//! once while its account's other devices go on; a refresh token used twice revokes its
//! family on the wire; refusals are logged by reason and never with the token; other OS users
//! cannot reach the local sockets; a wrong pinned fingerprint stops `ferry register` before
//! anything is sent; enrolment attempts are rate limited per address.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::{
    Device, RawClient, Relay, Runtime, TIMEOUT, device_key, docs, enrolment, put_doc, status,
    stderr, wait_caught_up, wait_for, wait_for_ok,
};
use ed25519_dalek::SigningKey;
use ferry_proto::session::device_id;
use ferry_proto::wire::{Credential, ErrorCode, LogEntry, Message, Secret, Tokens};
use serde_json::{Value, json};

fn seqs_and_ids(entries: &[LogEntry]) -> Vec<(u64, String)> {
    entries.iter().map(|e| (e.seq, e.record.clone())).collect()
}

fn welcome_tokens(answer: Message) -> Option<Tokens> {
    match answer {
        Message::Welcome { tokens, .. } => tokens,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn refusal(answer: Message) -> (ErrorCode, String) {
    match answer {
        Message::Error { code, message } => (code, message),
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn device_tokens(device: &Device) -> Tokens {
    let text = std::fs::read(device.data_dir.join("tokens.json")).expect("tokens.json");
    serde_json::from_slice(&text).expect("tokens.json holds tokens")
}

#[test]
fn accounts_never_see_each_others_records() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let a1 = Device::new();
    let a2 = Device::new();
    let b1 = Device::new();
    let c1 = Device::new();
    for (device, account) in [
        (&a1, "alpha"),
        (&a2, "alpha"),
        (&b1, "beta"),
        (&c1, "gamma"),
    ] {
        device.join_account(&relay, account);
    }
    let (da1, da2, db1, dc1) = (
        a1.start_daemon_logged(),
        a2.start_daemon_logged(),
        b1.start_daemon_logged(),
        c1.start_daemon_logged(),
    );

    put_doc(&da1, "shared", json!({ "owner": "alpha" }));
    put_doc(&da1, "alpha-only", json!({ "owner": "alpha" }));
    wait_caught_up(&da1, 2);
    wait_caught_up(&da2, 2);
    // Beta writes alpha's ids (it could know them) and a guessed one; gamma its own.
    put_doc(&db1, "shared", json!({ "owner": "beta" }));
    put_doc(&db1, "alpha-only", json!({ "owner": "beta" }));
    put_doc(&db1, "r1", json!({ "owner": "beta" }));
    wait_caught_up(&db1, 3);
    put_doc(&dc1, "gamma-only", json!({ "owner": "gamma" }));
    wait_caught_up(&dc1, 1);

    // A raw device of beta: it downloads beta's log from the start and listens for pushes.
    let rt = Runtime::new();
    let beta_key = SigningKey::from_bytes(&[0xb2; 32]);
    let (mut beta_raw, answer) = rt.run(
        "beta's raw sign-in",
        RawClient::sign_in(&relay, &beta_key, "beta", enrolment(&relay, "beta")),
    );
    let beta_tokens = welcome_tokens(answer).expect("tokens for a new device");
    let (head, log) = rt.run("beta's download", beta_raw.download(0));
    assert_eq!(head, 3);
    assert_eq!(
        seqs_and_ids(&log),
        [
            (1, "shared".into()),
            (2, "alpha-only".into()),
            (3, "r1".into())
        ]
    );

    // Alpha writes while beta listens; then beta's daemon writes. The only push beta's raw
    // session gets is beta's write: the stream is ordered, so nothing of alpha's came first.
    put_doc(&da1, "alpha-later", json!({ "owner": "alpha" }));
    wait_caught_up(&da2, 3);
    put_doc(&db1, "beta-later", json!({ "owner": "beta" }));
    match rt.run("beta's push", beta_raw.recv()) {
        Message::Changes {
            pushed: true,
            entries,
            head,
            ..
        } => {
            assert_eq!(seqs_and_ids(&entries), [(4, "beta-later".into())]);
            assert_eq!(head, 4);
        }
        other => panic!("expected a push of beta's write, got {other:?}"),
    }
    // From a cursor inside beta's log: beta's entries only. From one past it (where alpha's
    // longer log would go on): the relay says beta's log ends at beta's head, and stops.
    let (head, log) = rt.run("beta's download from 2", beta_raw.download(2));
    assert_eq!(
        (head, seqs_and_ids(&log)),
        (4, vec![(3, "r1".into()), (4, "beta-later".into())])
    );
    rt.run(
        "a download past beta's log",
        beta_raw.send(Message::Download {
            since: 5,
            max_changes: 10,
        }),
    );
    let (code, message) = refusal(rt.run("the answer past beta's log", beta_raw.recv()));
    assert_eq!(code, ErrorCode::UnexpectedMessage, "{message}");
    assert!(message.contains("up to 5 but it ends at 4"), "{message}");
    wait_caught_up(&db1, 4);
    wait_caught_up(&da1, 3);

    let owned_by = |owner: &str| json!({ "owner": owner });
    let expected_alpha = vec![
        ("alpha-later".to_string(), owned_by("alpha")),
        ("alpha-only".to_string(), owned_by("alpha")),
        ("shared".to_string(), owned_by("alpha")),
    ];
    assert_eq!(docs(&da1), expected_alpha);
    assert_eq!(docs(&da2), expected_alpha);
    assert_eq!(
        docs(&db1),
        vec![
            ("alpha-only".to_string(), owned_by("beta")),
            ("beta-later".to_string(), owned_by("beta")),
            ("r1".to_string(), owned_by("beta")),
            ("shared".to_string(), owned_by("beta")),
        ]
    );
    assert_eq!(
        docs(&dc1),
        vec![("gamma-only".to_string(), owned_by("gamma"))]
    );

    // Saying alpha's space in Hello gets exactly the answer a space that does not exist gets,
    // whatever beta's device shows; so does a device nobody registered.
    let stranger = SigningKey::from_bytes(&[0x5e; 32]);
    let attempts: [(&str, &SigningKey, Credential); 5] = [
        ("beta's key", &beta_key, Credential::Key),
        (
            "beta's access token",
            &beta_key,
            Credential::Access(beta_tokens.access.clone()),
        ),
        (
            "beta's refresh token",
            &beta_key,
            Credential::Refresh(beta_tokens.refresh.clone()),
        ),
        ("an unregistered key", &stranger, Credential::Key),
        (
            "beta's enrolment code",
            &stranger,
            enrolment(&relay, "beta"),
        ),
    ];
    for (what, key, credential) in attempts {
        let [alpha_answer, nowhere_answer] = ["alpha", "no-such-space"].map(|space| {
            let (_client, answer) = rt.run(
                "a sign-in for another space",
                RawClient::sign_in(&relay, key, space, credential.clone()),
            );
            refusal(answer)
        });
        assert_eq!(alpha_answer, nowhere_answer, "{what}");
        assert!(
            matches!(
                alpha_answer.0,
                ErrorCode::Forbidden | ErrorCode::AuthenticationFailed
            ),
            "{what}: {alpha_answer:?}"
        );
    }
    // None of that changed alpha's log.
    put_doc(&da2, "alpha-last", json!({ "owner": "alpha" }));
    wait_caught_up(&da1, 4);
    assert_eq!(docs(&da1).len(), 4);
}

#[test]
fn revoking_a_connected_device_ends_its_session_at_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let (gone, kept) = (Device::new(), Device::new());
    gone.join(&relay);
    kept.join(&relay);
    let gone_id = device_id(&device_key(&gone).verifying_key().to_bytes());
    let (dg, dk) = (gone.start_daemon_logged(), kept.start_daemon_logged());
    put_doc(&dg, "before", json!({ "n": 1 }));
    wait_caught_up(&dg, 1);
    wait_caught_up(&dk, 1);

    let held = device_tokens(&gone);
    let out = relay.operator().ferry(&["relay", "revoke", &gone_id]);
    assert!(out.status.success(), "ferry relay revoke: {}", stderr(&out));
    let error = wait_for_ok("the revoked device's session to end", TIMEOUT, || {
        let error = status(&dg)["sync"]["last_error"].clone();
        if error["kind"] == json!("authentication") {
            Ok(error)
        } else {
            Err(error.to_string())
        }
    });
    assert!(error.to_string().contains("revoked"), "{error}");

    // Its writes no longer reach the relay: `ferry sync` fails, saying why.
    put_doc(&dg, "after", json!({ "n": 2 }));
    let out = gone.ferry(&["sync"]);
    assert!(
        !out.status.success(),
        "ferry sync on a revoked device worked"
    );
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    // The other device goes on; the relay's log holds its write right after the first.
    put_doc(&dk, "kept", json!({ "n": 3 }));
    wait_caught_up(&dk, 2);
    let ids: Vec<_> = docs(&dk).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["before", "kept"]);

    let out = relay.operator().ferry(&["--json", "relay", "devices"]);
    assert!(
        out.status.success(),
        "ferry relay devices: {}",
        stderr(&out)
    );
    let devices: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let revoked: Vec<(String, bool)> = devices
        .as_array()
        .expect("a list")
        .iter()
        .map(|d| {
            (
                d["device"].as_str().expect("id").to_string(),
                !d["revoked_ms"].is_null(),
            )
        })
        .collect();
    let kept_id = device_id(&device_key(&kept).verifying_key().to_bytes());
    let mut expected = vec![(gone_id.clone(), true), (kept_id, false)];
    expected.sort();
    assert_eq!(revoked, expected);

    assert!(relay.log().contains("device signed in"));
    // Its reconnections are refused, logged by reason, with no token in the log.
    wait_for(
        "the relay to log a revoked device's sign-in",
        TIMEOUT,
        || relay.log().contains("reason=\"device_revoked\""),
    );
    assert_not_logged(&relay, &gone, &[&held.access, &held.refresh]);
}

/// Neither the relay's log nor the device's holds any of `secrets`.
fn assert_not_logged(relay: &Relay, device: &Device, secrets: &[&Secret]) {
    let daemon_log = std::fs::read_to_string(device.log_path()).expect("the daemon's log");
    for (whose, log) in [("relay", relay.log()), ("daemon", daemon_log)] {
        assert!(!log.is_empty(), "the {whose} logged nothing");
        for secret in secrets {
            assert!(
                !log.contains(secret.expose()),
                "a token is in the {whose}'s log"
            );
        }
    }
}

#[test]
fn a_refresh_token_used_twice_on_the_wire_revokes_its_family() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // Access tokens this short are never shown: the device signs in with its refresh token.
    let relay = Relay::start_with_config(
        &tmp.path().join("relay"),
        None,
        "[relay]\naccess_token_secs = 60\nenrolments_per_minute = 10000\n\
         sign_ins_per_minute = 100000\n",
    );
    let device = Device::new();
    device.join(&relay);
    let held = device_tokens(&device);
    let key = device_key(&device);

    let rt = Runtime::new();
    let (_raw, answer) = rt.run(
        "a raw refresh",
        RawClient::sign_in(
            &relay,
            &key,
            "default",
            Credential::Refresh(held.refresh.clone()),
        ),
    );
    let stolen = welcome_tokens(answer).expect("the refresh rotates");

    // The device shows the refresh token it holds, already rotated: the family is revoked,
    // and the device signs in with its key instead and syncs.
    let daemon = device.start_daemon_logged();
    put_doc(&daemon, "still-syncs", json!({ "n": 1 }));
    wait_caught_up(&daemon, 1);
    wait_for("the relay to log the reuse", TIMEOUT, || {
        relay.log().contains("reason=\"reused\"")
    });

    for (what, credential) in [
        ("access", Credential::Access(stolen.access.clone())),
        ("refresh", Credential::Refresh(stolen.refresh.clone())),
    ] {
        let (_raw, answer) = rt.run(
            "a sign-in with the revoked family",
            RawClient::sign_in(&relay, &key, "default", credential),
        );
        let (code, message) = refusal(answer);
        assert_eq!(code, ErrorCode::AuthenticationFailed, "{what}: {message}");
        assert!(message.contains("revoked"), "{what}: {message}");
    }
    let now_held = device_tokens(&device);
    assert_not_logged(
        &relay,
        &device,
        &[
            &held.access,
            &held.refresh,
            &stolen.access,
            &stolen.refresh,
            &now_held.access,
            &now_held.refresh,
        ],
    );
}

#[test]
fn enrolment_attempts_are_rate_limited_per_address() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start_with_config(
        &tmp.path().join("relay"),
        None,
        "[relay]\nenrolments_per_minute = 2\nsign_ins_per_minute = 100000\n",
    );
    let register = |device: &Device, code: &str| {
        device.ferry(&[
            "register",
            "--relay",
            &relay.addr,
            "--fingerprint",
            &relay.fingerprint,
            "--code",
            code,
        ])
    };
    let device = Device::new();
    let guessed = format!("default/{}", "A".repeat(24));
    for _ in 0..2 {
        let out = register(&device, &guessed);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("enrolment code is not valid"),
            "{}",
            stderr(&out)
        );
    }
    // Over the limit, even a good code is turned away before it is looked at.
    let code = relay.operator().enrol("default");
    let out = register(&device, &code);
    assert!(!out.status.success(), "registered over the limit");
    assert!(
        stderr(&out).contains("too many sign-in attempts"),
        "{}",
        stderr(&out)
    );
    wait_for("the relay to log the limit", TIMEOUT, || {
        relay.log().contains("sign-in rate limited")
    });
    let log = relay.log();
    assert!(log.contains("reason=\"bad_enrolment_code\""), "{log}");
    // Every attempt was turned away: the log must not say any device got in.
    assert!(
        !log.contains("device authenticated") && !log.contains("device signed in"),
        "{log}"
    );
    assert!(!log.contains(&code) && !log.contains(&guessed["default/".len()..]));
}

#[test]
fn register_with_a_wrong_fingerprint_sends_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let device = Device::new();
    let code = relay.operator().enrol("default");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = device.ferry(&[
        "register",
        "--relay",
        &relay.addr,
        "--fingerprint",
        &wrong,
        "--code",
        &code,
    ]);
    assert!(!out.status.success(), "registered with a wrong fingerprint");
    let said = stderr(&out);
    let pinned = format!("{}ab", "ab:".repeat(31));
    assert!(
        said.contains(&format!(
            "fingerprint {}, not the pinned {pinned}",
            relay.fingerprint
        )),
        "{said}"
    );
    assert!(!device.data_dir.join("registration.json").exists());
    assert!(!device.data_dir.join("tokens.json").exists());
    // The code never reached the relay: it still registers the device.
    let out = device.ferry(&[
        "register",
        "--relay",
        &relay.addr,
        "--fingerprint",
        &relay.fingerprint,
        "--code",
        &code,
    ]);
    assert!(out.status.success(), "ferry register: {}", stderr(&out));
}

/// Runs `ferry ARGS` as the unprivileged user `nobody` (uid and gid 65534).
fn ferry_as_nobody(args: &[&std::ffi::OsStr]) -> std::process::Output {
    use std::os::unix::process::CommandExt as _;
    std::process::Command::new(common::ferry_bin())
        .args(args)
        .env_remove("FERRY_CONFIG")
        .env_remove("RUST_LOG")
        .env("HOME", "/nonexistent")
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ferry as nobody")
}

/// Opens `dir` and its parents inside the temporary directory to everyone, so that only the
/// socket's own mode stands in the way.
fn open_up(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = std::env::temp_dir();
    for d in dir
        .ancestors()
        .take_while(|d| d.starts_with(&tmp) && *d != tmp)
    {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// Connects to a Unix socket as `nobody` with a system Python: `ferry` itself refuses to use a
/// data directory open to other users, so it cannot show that the socket's mode alone holds.
fn python_connects_as_nobody(socket: &std::path::Path) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt as _;
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let script = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])";
    Some(
        std::process::Command::new(python)
            .args(["-c", script])
            .arg(socket)
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run python as nobody"),
    )
}

#[test]
fn other_users_cannot_reach_the_daemon_or_relay_sockets() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not running as root: cannot check that other users are kept out");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs these tests as root"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start(&tmp.path().join("relay"), None);
    let device = Device::new();
    device.join(&relay);
    let _daemon = device.start_daemon_logged();
    assert!(device.ferry(&["status"]).status.success());
    assert!(
        relay
            .operator()
            .ferry(&["relay", "devices"])
            .status
            .success()
    );

    let daemon_status = ferry_as_nobody(&[
        "--data-dir".as_ref(),
        device.data_dir.as_os_str(),
        "status".as_ref(),
    ]);
    let relay_devices = ferry_as_nobody(&[
        "--data-dir".as_ref(),
        relay.data_dir.as_os_str(),
        "relay".as_ref(),
        "devices".as_ref(),
    ]);
    for (what, out) in [("daemon", daemon_status), ("relay", relay_devices)] {
        assert!(!out.status.success(), "nobody reached the {what}'s socket");
        assert!(
            stderr(&out).contains("ermission denied"),
            "{what}: {}",
            stderr(&out)
        );
    }

    open_up(&device.data_dir);
    open_up(&relay.data_dir);
    for socket in [device.socket(), relay.data_dir.join("relay.sock")] {
        let Some(out) = python_connects_as_nobody(&socket) else {
            eprintln!(
                "no system python3: cannot check {} on its own",
                socket.display()
            );
            continue;
        };
        assert!(
            !out.status.success(),
            "nobody connected to {}",
            socket.display()
        );
        assert!(
            stderr(&out).contains("PermissionError"),
            "{}: {}",
            socket.display(),
            stderr(&out)
        );
    }
}
