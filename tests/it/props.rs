//! Property-based tests (proptest) of every parser that takes outside input: card numbers,
//! the JSON bodies of the main routes and the `Idempotency-Key` header (through the real
//! router in-process with tower's `oneshot`, on the embedded store and the sandbox
//! simulator), D1's notification bodies, D1's responses and JOSE objects (JWE, JWS), and the
//! configuration. Properties: never a panic, never a 5xx, never a card number echoed back.
//!
//! Bounded: a few hundred cases per property, no failure files written (`failure_persistence:
//! None`); a failing case is printed, shrunk, by proptest.

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use http::{Request, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::Config as PtConfig;
use serde_json::{Value, json};
use tokengate::app::Gateway;
use tokengate::config::Config;
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::jose;
use tower::ServiceExt;

use crate::support::app::ADMIN;

fn cfg(cases: u32) -> PtConfig {
    PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    }
}

// --- card numbers ------------------------------------------------------------------------------

/// `payload` completed with its Luhn check digit.
fn with_luhn(payload: &str) -> String {
    let mut sum = 0;
    for (i, c) in payload.bytes().rev().enumerate() {
        let mut d = u32::from(c - b'0');
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    format!("{payload}{}", (10 - sum % 10) % 10)
}

fn valid_pan() -> impl Strategy<Value = String> {
    "4[0-9]{14}".prop_map(|p| with_luhn(&p))
}

proptest! {
    #![proptest_config(cfg(512))]

    /// Any text: parsed or refused, never a panic; what is shown of a PAN is masked, and an
    /// error never quotes the input.
    #[test]
    fn pan_parse_any_text(s in "[0-9 -]{0,30}|\\PC{0,40}") {
        match s.parse::<Pan>() {
            Ok(p) => {
                let digits = p.expose_digits().to_owned();
                let (debug, display) = (format!("{:?}", p), format!("{}", p));
                prop_assert!(!debug.contains(&digits));
                prop_assert!(!display.contains(&digits));
            }
            Err(e) => {
                let digits: String = s.chars().filter(char::is_ascii_digit).collect();
                if digits.len() >= 6 {
                    prop_assert!(!e.to_string().contains(&digits));
                }
            }
        }
    }

    /// Every Luhn-valid 12-19 digit number parses, separators or not, to the same digits.
    #[test]
    fn valid_pans_parse(payload in "[1-9][0-9]{10,17}", sep in prop::sample::select(vec!["", " ", "-"])) {
        let pan = with_luhn(&payload);
        let spaced: String = pan
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(sep);
        let parsed: Pan = spaced.parse().expect("valid");
        prop_assert_eq!(parsed.expose_digits(), pan.as_str());
    }

    /// A card number sent as a JSON number is refused without quoting it.
    #[test]
    fn pan_as_json_number_is_not_echoed(n in 100_000_000_000u64..) {
        let err = serde_json::from_str::<Pan>(&n.to_string()).expect_err("numbers are refused");
        prop_assert!(!err.to_string().contains(&n.to_string()));
    }

    #[test]
    fn expiry_mmyy_any_text(s in "\\PC{0,8}") {
        if let Some(e) = Expiry::from_mmyy(&s) {
            prop_assert_eq!(Expiry::from_mmyy(&e.mmyy()), Some(e));
        }
    }
}

// --- JOSE and D1 responses ---------------------------------------------------------------------

fn dev_material() -> &'static DevMaterial {
    static M: OnceLock<DevMaterial> = OnceLock::new();
    M.get_or_init(|| DevMaterial::generate("props").expect("dev keys"))
}

fn b64url() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{0,60}"
}

proptest! {
    #![proptest_config(cfg(256))]

    /// Random compact JWEs (five base64url parts, or anything): an error, never a panic.
    #[test]
    fn jwe_decrypt_random_input(parts in prop::collection::vec(b64url(), 0..7), raw in "\\PC{0,80}") {
        let m = dev_material();
        let key = jose::secret_key_from_pem(&m.gateway_jwe_key_pem).expect("key");
        let keys = |_: &str| Some(key.clone());
        prop_assert!(jose::jwe_decrypt(&parts.join("."), &keys).is_err());
        let _ = jose::jwe_decrypt(&raw, &keys);
    }

    /// A real JWE with one character changed: refused (or, if the change decodes to the same
    /// bytes, the same plaintext), never a panic.
    #[test]
    fn jwe_decrypt_tampered(pos in any::<prop::sample::Index>(), c in "[A-Za-z0-9_.-]") {
        let m = dev_material();
        let public = jose::public_key_from_pem(&m.gateway_jwe_pub_pem).expect("pub");
        let key = jose::secret_key_from_pem(&m.gateway_jwe_key_pem).expect("key");
        let plaintext = br#"{"cryptogram":"AAECAwQ="}"#;
        let jwe = jose::jwe_encrypt(plaintext, &public, &m.gateway_jwe_kid).expect("encrypt");
        let mut bytes = jwe.into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = c.as_bytes()[0];
        let tampered = String::from_utf8(bytes).expect("ascii");
        let keys = |_: &str| Some(key.clone());
        if let Ok((_, out)) = jose::jwe_decrypt(&tampered, &keys) {
            prop_assert_eq!(&out[..], &plaintext[..]);
        }
    }

    /// Random JWS: an error, never a panic.
    #[test]
    fn jws_verify_random_input(parts in prop::collection::vec(b64url(), 0..5), raw in "\\PC{0,80}") {
        let m = dev_material();
        let public = jose::public_key_from_pem(&m.gateway_es256_pub_pem).expect("pub");
        let keys = |_: &str| Some(public);
        let lifetime = std::time::Duration::from_secs(300);
        prop_assert!(jose::verify_assertion(&parts.join("."), &keys, lifetime).is_err());
        prop_assert!(jose::verify_assertion(&raw, &keys, lifetime).is_err());
    }

    /// D1's response bodies, as JSON of any shape: decoded or refused, never a panic.
    #[test]
    fn d1_responses_any_json(v in json_value()) {
        use tokengate_d1_protocol::model::{
            CryptogramPlaintext, ErrorBody, OAuthTokenResponse, OnboardMerchantResponse,
            TokenObject, TransactionResponse,
        };
        let s = v.to_string();
        let _ = serde_json::from_str::<TokenObject>(&s);
        let _ = serde_json::from_str::<TransactionResponse>(&s);
        let _ = serde_json::from_str::<ErrorBody>(&s);
        let _ = serde_json::from_str::<OAuthTokenResponse>(&s);
        let _ = serde_json::from_str::<OnboardMerchantResponse>(&s);
        let _ = serde_json::from_str::<CryptogramPlaintext>(&s);
    }
}

// --- JSON of any shape -------------------------------------------------------------------------

fn json_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
        valid_pan().prop_map(Value::from),
        prop::sample::select(vec![
            "ACTIVE",
            "SUSPENDED",
            "DELETED",
            "CARD_ON_FILE",
            "RECURRING",
            "CIT",
            "MIT",
            "token.activated",
            "2030-12-01T00:00:00Z",
            "1230",
            "https://example.com/h",
        ])
        .prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_scalar().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with the route's field names, each a value of any shape (so the parsers see
/// near-valid bodies, not only garbage), plus random extra fields.
fn shaped(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(
            (prop::sample::select(fields), json_value()),
            0..fields.len() + 2,
        ),
        prop::collection::btree_map("[a-z]{1,8}", json_scalar(), 0..2),
    )
        .prop_map(|(pairs, extra)| {
            let mut o: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in pairs {
                o.insert(k.to_owned(), v);
            }
            Value::Object(o)
        })
}

fn card_body() -> impl Strategy<Value = Value> {
    (
        shaped(&["number", "expiryMonth", "expiryYear", "holderName", "cvc"]),
        shaped(&["card", "usage", "customerReference"]),
        valid_pan(),
        1u8..=12,
        2027u16..2040,
        any::<bool>(),
    )
        .prop_map(|(card, mut body, pan, mm, yy, plausible)| {
            let card = if plausible {
                json!({"number": pan, "expiryMonth": mm, "expiryYear": yy})
            } else {
                card
            };
            if let Value::Object(o) = &mut body {
                o.insert("card".into(), card);
            }
            body
        })
}

// --- the router, in-process --------------------------------------------------------------------

/// A gateway on the embedded store with the sandbox simulator, driven through its router
/// without sockets; one per test binary (the runtime keeps the simulator running).
struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
    key: String,
    token: String,
    d1_token: String,
    d1_merchant: String,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        crate::support::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let env: Vec<(String, String)> = [
            ("TOKENGATE__SERVER__LISTEN", "127.0.0.1:0".to_owned()),
            ("TOKENGATE__SIM__LISTEN", "127.0.0.1:0".to_owned()),
            ("TOKENGATE__SIM__CONTROL_LISTEN", "127.0.0.1:0".to_owned()),
            ("TOKENGATE__LOG__LEVEL", "warn".to_owned()),
            ("TOKENGATE_ADMIN_TOKEN", ADMIN.to_owned()),
            ("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", "0".to_owned()),
            ("TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S", "0".to_owned()),
            ("TOKENGATE__NOTIFY__REQUIRE_AUTH", "false".to_owned()),
            ("TOKENGATE__RECONCILE__ENABLED", "false".to_owned()),
            (
                "TOKENGATE__STORAGE__DATA_DIR",
                dir.path().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let cfg = Config::load_with_env(None, &env).expect("config");
        let (router, key, token, d1_token, d1_merchant) = rt.block_on(async {
            let gw = Gateway::build(&cfg, "127.0.0.1:9".parse().expect("addr"))
                .await
                .expect("gateway");
            let router = tokengate::http::router(gw.state.clone(), &gw.settings);
            // The simulator and the rest of the gateway live as long as the runtime.
            std::mem::forget(gw);
            let (status, m) = call(&router, "POST", "/v1/merchants", Some(ADMIN), &[], json!({"name": "props"}).to_string()).await;
            assert_eq!(status, 201, "{m}");
            let key = m["apiKey"].as_str().expect("key").to_owned();
            let id = m["id"].as_str().expect("id").to_owned();
            let body = json!({"card": {"number": "4111111111111111", "expiryMonth": 12, "expiryYear": 2031}, "usage": "CARD_ON_FILE"});
            let (status, t) = call(&router, "POST", "/v1/tokens", Some(&key), &[], body.to_string()).await;
            assert_eq!(status, 201, "{t}");
            let token = t["id"].as_str().expect("token").to_owned();
            let d1_token = t["networkToken"]["id"].as_str().unwrap_or("d1-none").to_owned();
            let d1_merchant = m["d1MerchantId"].as_str().unwrap_or(&id).to_owned();
            (router, key, token, d1_token, d1_merchant)
        });
        Harness {
            rt,
            router,
            key,
            token,
            d1_token,
            d1_merchant,
            _dir: dir,
        }
    })
}

/// One request through the router; the status and the body (JSON, or `Null`).
async fn call(
    router: &Router,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, Vec<u8>)],
    body: impl Into<Body>,
) -> (u16, Value) {
    let (status, bytes) = call_raw(router, method, path, bearer, headers, body).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn call_raw(
    router: &Router,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, Vec<u8>)],
    body: impl Into<Body>,
) -> (u16, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(b) = bearer {
        req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
    }
    for (k, v) in headers {
        req = req.header(*k, v.as_slice());
    }
    let req = req.body(body.into()).expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    (status, bytes)
}

/// Every 12+ digit run in `v` (card numbers the request carried).
fn digit_runs(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|r| r.len() >= 12)
        .map(str::to_owned)
        .collect()
}

/// The route answered below 500 and echoed no card number of the request.
fn check(status: u16, sent: &str, answer: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(status < 500, "status {status} for {sent}");
    let text = String::from_utf8_lossy(answer);
    for pan in digit_runs(sent) {
        if pan.parse::<Pan>().is_ok() {
            prop_assert!(!text.contains(&pan), "card number echoed: {text}");
        }
    }
    Ok(())
}

fn run(
    method: &'static str,
    path: &str,
    headers: &[(&str, Vec<u8>)],
    body: String,
    bearer: bool,
) -> Result<(), TestCaseError> {
    let h = harness();
    let key = bearer.then_some(h.key.as_str());
    let (status, answer) = h.rt.block_on(call_raw(
        &h.router,
        method,
        path,
        key,
        headers,
        body.clone(),
    ));
    check(status, &body, &answer)
}

proptest! {
    #![proptest_config(cfg(192))]

    #[test]
    fn tokenize_body(body in card_body()) {
        run("POST", "/v1/tokens", &[], body.to_string(), true)?;
    }

    #[test]
    fn tokenize_raw_bytes(body in "\\PC{0,200}") {
        run("POST", "/v1/tokens", &[], body, true)?;
    }

    /// Any `Idempotency-Key` value a client can send, with a body of any shape.
    #[test]
    fn idempotency_key_header(key in prop::collection::vec(32u8..127, 0..300), body in card_body()) {
        run("POST", "/v1/tokens", &[("idempotency-key", key)], body.to_string(), true)?;
    }

    /// Free text the API stores and shows back (a customer reference, a merchant name, an API
    /// key name) holding a card number: refused (422), and the number not echoed.
    #[test]
    fn free_text_with_a_card_number(pan in valid_pan(), before in "[a-z ]{0,6}", after in "[a-z ]{0,6}", sep in prop::sample::select(vec!["", " ", "-"])) {
        let h = harness();
        let spaced: String = pan
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(sep);
        let text = format!("{before}{spaced}{after}");
        let tokenize = json!({
            "card": {"number": "5555555555554444", "expiryMonth": 12, "expiryYear": 2031},
            "usage": "CARD_ON_FILE",
            "customerReference": text,
        })
        .to_string();
        let merchant = json!({"name": text}).to_string();
        let key = json!({"name": text, "scopes": ["tokens:read"]}).to_string();
        for (path, bearer, body) in [
            ("/v1/tokens", h.key.as_str(), tokenize),
            ("/v1/merchants", ADMIN, merchant),
            ("/v1/api-keys", h.key.as_str(), key),
        ] {
            let (status, answer) = h.rt.block_on(call_raw(
                &h.router, "POST", path, Some(bearer), &[], body.clone(),
            ));
            prop_assert_eq!(status, 422, "{} {}", path, String::from_utf8_lossy(&answer));
            check(status, &body.replace([' ', '-'], ""), &answer)?;
            prop_assert!(!String::from_utf8_lossy(&answer).contains(&text));
        }
    }

    #[test]
    fn cryptogram_body(body in shaped(&["transactionType", "amount", "currency", "value"])) {
        let path = format!("/v1/tokens/{}/cryptograms", harness().token);
        run("POST", &path, &[], body.to_string(), true)?;
    }

    #[test]
    fn agreement_body(body in shaped(&["networkTransactionId", "frequency", "amount", "startDate", "endDate", "maxAmount"])) {
        let path = format!("/v1/tokens/{}/recurring-agreement", harness().token);
        run("PUT", &path, &[], body.to_string(), true)?;
    }

    #[test]
    fn webhook_endpoint_body(body in shaped(&["url", "events"])) {
        run("POST", "/v1/webhook-endpoints", &[], body.to_string(), true)?;
    }

    #[test]
    fn merchant_body(body in shaped(&["name"])) {
        let h = harness();
        let (status, answer) = h.rt.block_on(call_raw(
            &h.router, "POST", "/v1/merchants", Some(ADMIN), &[], body.to_string(),
        ));
        check(status, &body.to_string(), &answer)?;
    }

    /// D1's notification body, any shape, for a known and an unknown token.
    #[test]
    fn notification_body(
        body in shaped(&["eventId", "eventType", "timestamp", "tokenId", "requestId", "status", "tokenLastDigits", "tokenExpiryDate", "cardLastDigits", "cardExpiryDate", "par"]),
        known in any::<bool>(),
    ) {
        let h = harness();
        let token = if known { h.d1_token.as_str() } else { "d1-unknown" };
        let path = format!(
            "/merchant-gateways/tokengate-sandbox/merchants/{}/tokens/{token}/notify-update",
            h.d1_merchant
        );
        run("POST", &path, &[], body.to_string(), false)?;
    }
}

// --- configuration -----------------------------------------------------------------------------

const CONFIG_KEYS: &[&str] = &[
    "TOKENGATE__SERVER__LISTEN",
    "TOKENGATE__SERVER__MAX_CONCURRENCY",
    "TOKENGATE__SERVER__BODY_LIMIT_BYTES",
    "TOKENGATE__STORAGE__REDIS_URL",
    "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES",
    "TOKENGATE__STORAGE__DATA_DIR",
    "TOKENGATE__RATE_LIMIT__PER_KEY_PER_S",
    "TOKENGATE__WEBHOOKS__CLAIM_IDLE_MS",
    "TOKENGATE__WEBHOOKS__ALLOW_PRIVATE_NETWORKS",
    "TOKENGATE__VAULT__ACTIVE_KEY_ID",
    "TOKENGATE__VAULT__KEYS__K1",
    "TOKENGATE__NOTIFY__CLIENT_SECRET",
    "TOKENGATE__D1__CALL_TIMEOUT_MS",
    "TOKENGATE__LOG__LEVEL",
    "TOKENGATE__MODE",
    "TOKENGATE_ADMIN_TOKEN",
];

proptest! {
    #![proptest_config(cfg(256))]

    /// Environment overrides of any text: loaded or refused with an error, never a panic; the
    /// cross-field validation never panics either.
    #[test]
    fn config_env_any_values(pairs in prop::collection::vec((prop::sample::select(CONFIG_KEYS), "\\PC{0,40}|[\\[\\]{}\"'=,.:0-9a-z\\n\\\\ ]{0,40}"), 0..4)) {
        let env: Vec<(String, String)> = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        if let Ok(cfg) = Config::load_with_env(None, &env) {
            let _ = cfg.validate();
        }
    }

    /// A config file of any text.
    #[test]
    fn config_file_any_text(text in "\\PC{0,200}|([a-z_]{1,10} = [\\[\\]{}\"0-9a-z,. ]{0,20}\\n|\\[[a-z_.]{1,12}\\]\\n){0,8}") {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokengate.toml");
        std::fs::write(&path, text).expect("write");
        if let Ok(cfg) = Config::load_with_env(Some(&path), &[]) {
            let _ = cfg.validate();
        }
    }
}
