//! Drift test of `GET /openapi.json`: real responses of a running gateway (sandbox mode, the
//! in-process D1 simulator) must validate against the schemas the document declares for their
//! path, method and status, and the document and the router must list the same routes.
//!
//! Validation is strict where utoipa is lenient: every object schema of the document gets
//! `additionalProperties: false` before validating, so a response field the document does not
//! declare fails the test, not only a missing or mistyped one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::support::app::{ADMIN, Backend, TestApp, card_body};

const VISA: &str = "4111111111111111";
const PROBLEM_JSON: &str = "application/problem+json";
const D1_CLIENT: &str = "drift-d1";
const D1_SECRET: &str = "drift-secret-0123456789-abcdefghijkl";
const MGID: &str = "tokengate-sandbox";

/// The document plus the checks made against it.
struct Contract {
    doc: Value,
    /// `components` with every object schema closed (see the module docs).
    strict_components: Value,
    /// (method, path template, status) of every response validated.
    seen: BTreeSet<(String, String, u16)>,
}

/// Adds `additionalProperties: false` to every schema with `properties` that does not say
/// otherwise.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for child in map.values_mut() {
                close_objects(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

impl Contract {
    async fn fetch(app: &TestApp) -> Contract {
        let r = app
            .client
            .get(app.url("/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            essence(r.headers()["content-type"].to_str().unwrap()),
            "application/json"
        );
        let doc: Value = r.json().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0", "OpenAPI 3.1");
        let mut strict_components = doc["components"].clone();
        close_objects(&mut strict_components);
        Contract {
            doc,
            strict_components,
            seen: BTreeSet::new(),
        }
    }

    /// Validates a real response against the document: the status must be documented for this
    /// operation, the content type must be the documented one, and the body must match its
    /// schema. Returns the body (JSON, or a JSON string for non-JSON bodies).
    async fn check(&mut self, method: &str, template: &str, r: Response) -> Value {
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(essence)
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        // Errors are problem+json everywhere but OAuth's own token endpoint (RFC 6749 format).
        if status >= 400 && template != "/oauth2/token" {
            assert_eq!(ct, PROBLEM_JSON, "{method} {template} {status}: {text}");
        }
        let documented = &self.doc["paths"][template][method.to_ascii_lowercase()]["responses"]
            [status.to_string()];
        if documented.is_object() && documented.get("content").is_none() {
            assert!(
                text.is_empty(),
                "{method} {template} {status}: undocumented body"
            );
            self.seen
                .insert((method.to_owned(), template.to_owned(), status));
            return Value::Null;
        }
        let (validator, media) = self.validator(method, template, status, &ct);
        let body: Value = if media.ends_with("json") {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {template}: {e}"))
        } else {
            Value::String(text)
        };
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: body does not match the document: {errors:#?}\nbody: {body}"
        );
        // A problem's code must be one its route documents for that status (the catalogue's
        // `x-problem-codes`, src/http/problem/codes.rs), not merely a well-formed problem.
        if media == PROBLEM_JSON {
            let codes = &documented["x-problem-codes"];
            assert!(
                codes.as_array().is_some_and(|c| c.contains(&body["code"])),
                "{method} {template} {status}: code {} is not documented for this route ({codes})",
                body["code"]
            );
        }
        self.seen
            .insert((method.to_owned(), template.to_owned(), status));
        body
    }

    /// The validator of the documented body of one response, and its media type. Panics when
    /// the response, or a body with this content type, is not documented.
    fn validator(
        &self,
        method: &str,
        template: &str,
        status: u16,
        ct: &str,
    ) -> (jsonschema::Validator, String) {
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in the document");
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {template} answered {status}, which the document does not list"
        );
        let content = resp["content"].as_object().unwrap_or_else(|| {
            panic!("{method} {template} {status}: the document declares no body")
        });
        let (media, spec) = content
            .iter()
            .find(|(m, _)| essence(m) == ct)
            .unwrap_or_else(|| {
                panic!(
                    "{method} {template} {status}: content type {ct:?} not documented (documented: {:?})",
                    content.keys().collect::<Vec<_>>()
                )
            });
        let mut root = spec["schema"].clone();
        close_objects(&mut root);
        let Value::Object(map) = &mut root else {
            panic!("{method} {template} {status}: schema is not an object")
        };
        map.insert("components".into(), self.strict_components.clone());
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: bad schema: {e}"));
        (validator, media.clone())
    }

    /// Every (method, path) the document lists.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    ops.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        ops
    }
}

/// Problem bodies must also carry the code the test expects.
fn assert_code(body: &Value, code: &str) {
    assert_eq!(body["code"], code, "{body}");
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Response {
    let mut rb = app.client.request(method, app.url(path));
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    if let Some(v) = body {
        rb = rb.json(&v);
    }
    rb.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_match_the_document() {
    // Fixed D1 client credentials, so this test can play D1 at /oauth2/token and notify-update.
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__NOTIFY__CLIENT_ID", D1_CLIENT)
        .env("TOKENGATE__NOTIFY__CLIENT_SECRET", D1_SECRET)
        .start()
        .await;
    let mut c = Contract::fetch(&app).await;

    // Operations.
    let r = send(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!(c.check("GET", "/healthz", r).await["status"], "ok");
    let r = send(&app, Method::GET, "/readyz", None, None).await;
    assert_eq!(c.check("GET", "/readyz", r).await["status"], "ready");
    let r = send(&app, Method::GET, "/openapi.json", None, None).await;
    c.check("GET", "/openapi.json", r).await;

    // Merchants.
    let body = json!({"name": "Acme"});
    let r = send(
        &app,
        Method::POST,
        "/v1/merchants",
        Some("wrong"),
        Some(body.clone()),
    )
    .await;
    assert_code(&c.check("POST", "/v1/merchants", r).await, "unauthorized");
    let r = send(&app, Method::POST, "/v1/merchants", Some(ADMIN), Some(body)).await;
    let m = c.check("POST", "/v1/merchants", r).await;
    assert!(m["d1MerchantId"].is_string(), "{m}");
    let key = m["apiKey"].as_str().unwrap().to_owned();
    let r = send(
        &app,
        Method::POST,
        "/v1/merchants",
        Some(ADMIN),
        Some(json!({"name": ""})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/merchants", r).await,
        "invalid_merchant_name",
    );

    // Client certificates bound to the merchant (admin).
    let certs_template = "/v1/merchants/{id}/client-certs";
    let certs_path = format!("/v1/merchants/{}/client-certs", m["id"].as_str().unwrap());
    let r = send(&app, Method::GET, &certs_path, Some(ADMIN), None).await;
    assert_eq!(
        c.check("GET", certs_template, r).await["authMode"],
        "API_KEY"
    );
    let binding = json!({"authMode": "API_KEY",
        "certificates": [{"sha256": "ab".repeat(32), "name": "drift", "scopes": ["tokens:read"]}]});
    let r = send(&app, Method::PUT, &certs_path, Some(ADMIN), Some(binding)).await;
    assert_eq!(
        c.check("PUT", certs_template, r).await["certificates"][0]["name"],
        "drift"
    );
    let r = send(&app, Method::GET, &certs_path, Some(ADMIN), None).await;
    assert!(c.check("GET", certs_template, r).await["updatedAt"].is_string());
    let r = send(
        &app,
        Method::PUT,
        &certs_path,
        Some(ADMIN),
        Some(json!({"authMode": "CERT", "certificates": []})),
    )
    .await;
    assert_code(
        &c.check("PUT", certs_template, r).await,
        "client_cert_needed",
    );
    let r = send(
        &app,
        Method::GET,
        "/v1/merchants/mer_AAAAAAAAAAAAAAAA/client-certs",
        Some(ADMIN),
        None,
    )
    .await;
    assert_code(
        &c.check("GET", certs_template, r).await,
        "merchant_not_found",
    );
    // Unbound again: the merchant's key below works without a certificate either way.
    let r = send(
        &app,
        Method::PUT,
        &certs_path,
        Some(ADMIN),
        Some(json!({"authMode": "API_KEY", "certificates": []})),
    )
    .await;
    c.check("PUT", certs_template, r).await;

    // Tokens: 201, then 200 for the same card.
    let k = Some(key.as_str());
    let r = send(
        &app,
        Method::POST,
        "/v1/tokens",
        k,
        Some(card_body(VISA, 12, 2030)),
    )
    .await;
    assert_eq!(r.status(), 201);
    let t = c.check("POST", "/v1/tokens", r).await;
    assert_eq!(t["status"], "ACTIVE", "{t}");
    assert!(t["networkToken"].is_object(), "{t}");
    let id = t["id"].as_str().unwrap().to_owned();
    // The validation can fail: an undeclared field, a missing one, a wrong type are refused.
    let (v, _) = c.validator("POST", "/v1/tokens", 201, "application/json");
    assert!(v.is_valid(&t));
    let mut extra = t.clone();
    extra["pan"] = json!(VISA);
    assert!(!v.is_valid(&extra), "undeclared field accepted");
    let mut missing = t.clone();
    missing.as_object_mut().unwrap().remove("status");
    assert!(!v.is_valid(&missing), "missing field accepted");
    let mut nested = t.clone();
    nested["card"]["expiryMonth"] = json!("12");
    assert!(!v.is_valid(&nested), "wrong nested type accepted");
    let mut brand = t.clone();
    brand["card"]["brand"] = json!("NOT_A_BRAND");
    assert!(!v.is_valid(&brand), "unknown enum value accepted");
    let r = send(
        &app,
        Method::POST,
        "/v1/tokens",
        k,
        Some(card_body(VISA, 12, 2030)),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(c.check("POST", "/v1/tokens", r).await["id"], id.as_str());
    let r = send(&app, Method::GET, &format!("/v1/tokens/{id}"), k, None).await;
    c.check("GET", "/v1/tokens/{id}", r).await;

    // API keys, card reveal and the audit trail (tests/it/audit.rs tests the behaviour).
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/tokens/{id}/reveal"),
        k,
        None,
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/tokens/{id}/reveal", r).await,
        "insufficient_scope",
    );
    let r = send(
        &app,
        Method::POST,
        "/v1/api-keys",
        k,
        Some(json!({"name": "pan-fallback", "scopes": ["card:reveal"]})),
    )
    .await;
    assert_eq!(r.status(), 201);
    let created = c.check("POST", "/v1/api-keys", r).await;
    let reveal_key = created["secret"].as_str().unwrap().to_owned();
    let reveal_id = created["id"].as_str().unwrap().to_owned();
    let r = send(
        &app,
        Method::POST,
        "/v1/api-keys",
        k,
        Some(json!({"name": "x", "scopes": ["nope"]})),
    )
    .await;
    assert_code(&c.check("POST", "/v1/api-keys", r).await, "invalid_scopes");
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/tokens/{id}/reveal"),
        Some(reveal_key.as_str()),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.check("POST", "/v1/tokens/{id}/reveal", r).await["number"],
        VISA
    );
    let r = send(&app, Method::GET, "/v1/api-keys", k, None).await;
    assert_eq!(r.status(), 200);
    c.check("GET", "/v1/api-keys", r).await;
    let r = send(&app, Method::GET, "/v1/audit-events?limit=2", k, None).await;
    assert_eq!(r.status(), 200);
    assert!(c.check("GET", "/v1/audit-events", r).await["nextCursor"].is_string());
    let r = send(
        &app,
        Method::GET,
        "/v1/audit-events",
        Some(reveal_key.as_str()),
        None,
    )
    .await;
    assert_code(
        &c.check("GET", "/v1/audit-events", r).await,
        "insufficient_scope",
    );
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v1/api-keys/{reveal_id}"),
        k,
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    c.check("DELETE", "/v1/api-keys/{id}", r).await;
    let r = send(&app, Method::DELETE, "/v1/api-keys/key_unknown", k, None).await;
    assert_code(
        &c.check("DELETE", "/v1/api-keys/{id}", r).await,
        "api_key_not_found",
    );
    // The admin's key for an existing merchant; the trail's key events carry `keyId`.
    let admin_keys = format!("/v1/merchants/{}/api-keys", m["id"].as_str().unwrap());
    let r = send(
        &app,
        Method::POST,
        &admin_keys,
        Some(ADMIN),
        Some(json!({"name": "recovery", "scopes": ["keys"]})),
    )
    .await;
    assert_eq!(r.status(), 201);
    let issued = c.check("POST", "/v1/merchants/{id}/api-keys", r).await;
    assert!(issued["secret"].as_str().unwrap().starts_with("tgk_"));
    let r = send(
        &app,
        Method::POST,
        "/v1/merchants/mer_AAAAAAAAAAAAAAAA/api-keys",
        Some(ADMIN),
        Some(json!({"name": "recovery", "scopes": ["keys"]})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/merchants/{id}/api-keys", r).await,
        "merchant_not_found",
    );
    let r = send(
        &app,
        Method::POST,
        &admin_keys,
        Some(ADMIN),
        Some(json!({"name": "recovery", "scopes": []})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/merchants/{id}/api-keys", r).await,
        "invalid_scopes",
    );
    let r = send(&app, Method::GET, "/v1/audit-events?limit=5", k, None).await;
    let page = c.check("GET", "/v1/audit-events", r).await;
    assert!(
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["keyId"] == issued["id"]),
        "{page}"
    );

    // Token problems: 400, 401, 404, 415, 422.
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_code(&c.check("POST", "/v1/tokens", r).await, "malformed_json");
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body("number=4111")
        .send()
        .await
        .unwrap();
    assert_code(
        &c.check("POST", "/v1/tokens", r).await,
        "unsupported_media_type",
    );
    let r = send(
        &app,
        Method::POST,
        "/v1/tokens",
        None,
        Some(card_body(VISA, 12, 2030)),
    )
    .await;
    assert_code(&c.check("POST", "/v1/tokens", r).await, "unauthorized");
    let r = send(
        &app,
        Method::POST,
        "/v1/tokens",
        k,
        Some(card_body("4111111111111112", 12, 2030)),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/tokens", r).await,
        "invalid_card_number_luhn",
    );
    let r = send(
        &app,
        Method::GET,
        "/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA",
        k,
        None,
    )
    .await;
    assert_code(
        &c.check("GET", "/v1/tokens/{id}", r).await,
        "token_not_found",
    );

    // Idempotency: the same key with another body.
    let first = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "drift-1")
        .json(&card_body("5555555555554444", 12, 2030))
        .send()
        .await
        .unwrap();
    c.check("POST", "/v1/tokens", first).await;
    let reused = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "drift-1")
        .json(&card_body(VISA, 11, 2031))
        .send()
        .await
        .unwrap();
    assert_code(
        &c.check("POST", "/v1/tokens", reused).await,
        "idempotency_key_reused",
    );

    // Webhooks: an endpoint first, so the lifecycle below records events for it. Deliveries to
    // a closed port fail and are retried, which is what the event views then show.
    let r = send(
        &app,
        Method::POST,
        "/v1/webhook-endpoints",
        k,
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["token.suspended", "token.resumed"]})),
    )
    .await;
    assert_eq!(r.status(), 201);
    let ep = c.check("POST", "/v1/webhook-endpoints", r).await;
    assert!(ep["secret"].is_string(), "{ep}");
    let ep_id = ep["id"].as_str().unwrap().to_owned();
    let r = send(
        &app,
        Method::POST,
        "/v1/webhook-endpoints",
        k,
        Some(json!({"url": "not a url", "events": ["token.suspended"]})),
    )
    .await;
    c.check("POST", "/v1/webhook-endpoints", r).await;
    let r = send(&app, Method::GET, "/v1/webhook-endpoints", k, None).await;
    c.check("GET", "/v1/webhook-endpoints", r).await;
    let r = send(
        &app,
        Method::GET,
        &format!("/v1/webhook-endpoints/{ep_id}"),
        k,
        None,
    )
    .await;
    c.check("GET", "/v1/webhook-endpoints/{id}", r).await;
    let r = send(&app, Method::GET, "/v1/webhook-endpoints/we_nope", k, None).await;
    c.check("GET", "/v1/webhook-endpoints/{id}", r).await;
    // Changing it (the URL stays the closed port, so the events below still fail), and
    // rotating its secret: the answer shows the new one, in the creation's schema.
    let ep_path = format!("/v1/webhook-endpoints/{ep_id}");
    let r = send(
        &app,
        Method::PATCH,
        &ep_path,
        k,
        Some(json!({"events": ["token.suspended", "token.resumed", "token.updated"]})),
    )
    .await;
    assert_eq!(r.status(), 200);
    c.check("PATCH", "/v1/webhook-endpoints/{id}", r).await;
    let r = send(
        &app,
        Method::PATCH,
        &ep_path,
        k,
        Some(json!({"url": "ftp://example.com/"})),
    )
    .await;
    assert_code(
        &c.check("PATCH", "/v1/webhook-endpoints/{id}", r).await,
        "invalid_webhook_url",
    );
    let r = send(
        &app,
        Method::PATCH,
        "/v1/webhook-endpoints/we_nope",
        k,
        Some(json!({"events": ["token.suspended"]})),
    )
    .await;
    c.check("PATCH", "/v1/webhook-endpoints/{id}", r).await;
    let rotate = format!("{ep_path}/rotate-secret");
    let r = send(
        &app,
        Method::POST,
        &rotate,
        k,
        Some(json!({"overlapSeconds": 3600})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let rotated = c
        .check("POST", "/v1/webhook-endpoints/{id}/rotate-secret", r)
        .await;
    assert!(
        rotated["secret"].is_string() && rotated["previousSecretExpiresAt"].is_string(),
        "{rotated}"
    );
    let r = send(&app, Method::POST, &rotate, k, None).await;
    assert_eq!(r.status(), 200);
    c.check("POST", "/v1/webhook-endpoints/{id}/rotate-secret", r)
        .await;
    let r = send(
        &app,
        Method::POST,
        &rotate,
        k,
        Some(json!({"overlapSeconds": 999_999})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/webhook-endpoints/{id}/rotate-secret", r)
            .await,
        "invalid_rotation_overlap",
    );
    let r = send(&app, Method::GET, &ep_path, k, None).await;
    let read = c.check("GET", "/v1/webhook-endpoints/{id}", r).await;
    assert!(
        read.get("secret").is_none() && read["secretRotatedAt"].is_string(),
        "{read}"
    );

    // Cryptograms and the lifecycle.
    let crypto_path = format!("/v1/tokens/{id}/cryptograms");
    let cit = json!({"transactionType": "CIT", "amount": {"value": 1299, "currency": "EUR"}});
    let r = send(&app, Method::POST, &crypto_path, k, Some(cit.clone())).await;
    assert_eq!(r.status(), 201);
    c.check("POST", "/v1/tokens/{id}/cryptograms", r).await;
    // Recurring agreements: recorded, read (also in the token), carried by an MIT, ended.
    let agreement_template = "/v1/tokens/{id}/recurring-agreement";
    let agreement_path = format!("/v1/tokens/{id}/recurring-agreement");
    let r = send(&app, Method::GET, &agreement_path, k, None).await;
    assert_code(
        &c.check("GET", agreement_template, r).await,
        "recurring_agreement_not_found",
    );
    let agreement = json!({"networkTransactionId": "MCC123ABC0115", "agreementReference": "sub_1",
        "amount": {"value": 1999, "currency": "EUR"}, "frequency": "MONTHLY",
        "initialTransactionAt": "2026-01-15T10:00:00Z"});
    let r = send(&app, Method::PUT, &agreement_path, k, Some(agreement)).await;
    assert_eq!(r.status(), 200);
    c.check("PUT", agreement_template, r).await;
    let r = send(&app, Method::GET, &agreement_path, k, None).await;
    assert_eq!(
        c.check("GET", agreement_template, r).await["frequency"],
        "MONTHLY"
    );
    let r = send(&app, Method::GET, &format!("/v1/tokens/{id}"), k, None).await;
    assert!(c.check("GET", "/v1/tokens/{id}", r).await["recurringAgreement"].is_object());
    let minimal = json!({"networkTransactionId": "MCC123ABC0115", "agreementReference": "sub_1"});
    let r = send(&app, Method::PUT, &agreement_path, k, Some(minimal)).await;
    assert!(c.check("PUT", agreement_template, r).await["amount"].is_null());
    let r = send(
        &app,
        Method::POST,
        &crypto_path,
        k,
        Some(json!({"transactionType": "MIT"})),
    )
    .await;
    assert_eq!(
        c.check("POST", "/v1/tokens/{id}/cryptograms", r).await["networkTransactionId"],
        "MCC123ABC0115"
    );
    let bad_agreement = json!({"networkTransactionId": "a b", "agreementReference": "sub_1"});
    let r = send(&app, Method::PUT, &agreement_path, k, Some(bad_agreement)).await;
    assert_code(
        &c.check("PUT", agreement_template, r).await,
        "invalid_network_transaction_id",
    );
    let r = send(&app, Method::DELETE, &agreement_path, k, None).await;
    assert_eq!(r.status(), 204);
    c.check("DELETE", agreement_template, r).await;
    let bad_amount = json!({"transactionType": "CIT", "amount": {"value": 1, "currency": "eur"}});
    let r = send(&app, Method::POST, &crypto_path, k, Some(bad_amount)).await;
    assert_code(
        &c.check("POST", "/v1/tokens/{id}/cryptograms", r).await,
        "invalid_amount",
    );
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/tokens/{id}/suspend"),
        k,
        None,
    )
    .await;
    assert_eq!(
        c.check("POST", "/v1/tokens/{id}/suspend", r).await["status"],
        "SUSPENDED"
    );
    let r = send(&app, Method::POST, &crypto_path, k, Some(cit)).await;
    assert_code(
        &c.check("POST", "/v1/tokens/{id}/cryptograms", r).await,
        "token_suspended",
    );
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/tokens/{id}/resume"),
        k,
        None,
    )
    .await;
    assert_eq!(
        c.check("POST", "/v1/tokens/{id}/resume", r).await["status"],
        "ACTIVE"
    );
    let r = send(&app, Method::DELETE, &format!("/v1/tokens/{id}"), k, None).await;
    assert_eq!(
        c.check("DELETE", "/v1/tokens/{id}", r).await["status"],
        "DELETED"
    );

    // The customer's wallet (tests/it/wallets.rs tests the behaviour). The delete-all names a
    // customer without tokens, so the tokens used below stay.
    let r = send(
        &app,
        Method::GET,
        "/v1/tokens?customerReference=cust-42&limit=1",
        k,
        None,
    )
    .await;
    let page = c.check("GET", "/v1/tokens", r).await;
    assert_eq!(page["data"][0]["customerReference"], "cust-42", "{page}");
    let r = send(&app, Method::GET, "/v1/tokens?limit=1", k, None).await;
    assert_code(&c.check("GET", "/v1/tokens", r).await, "invalid_query");
    let r = send(
        &app,
        Method::GET,
        "/v1/tokens?customerReference=cust-42&cursor=x",
        k,
        None,
    )
    .await;
    assert_code(&c.check("GET", "/v1/tokens", r).await, "invalid_cursor");
    let r = send(
        &app,
        Method::DELETE,
        "/v1/tokens?customerReference=nobody",
        k,
        None,
    )
    .await;
    let done = c.check("DELETE", "/v1/tokens", r).await;
    assert_eq!(done["deleted"], json!([]), "{done}");
    let r = send(
        &app,
        Method::DELETE,
        "/v1/tokens?customerReference=",
        k,
        None,
    )
    .await;
    assert_code(
        &c.check("DELETE", "/v1/tokens", r).await,
        "invalid_customer_reference",
    );
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/tokens/{id}/suspend"),
        k,
        None,
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/tokens/{id}/suspend", r).await,
        "token_deleted",
    );

    // The event log of the lifecycle above.
    let r = send(&app, Method::GET, "/v1/events?limit=10", k, None).await;
    let events = c.check("GET", "/v1/events", r).await;
    let event_id = events["data"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no webhook event recorded: {events}"))
        .to_owned();
    let r = send(&app, Method::GET, "/v1/events?limit=0", k, None).await;
    assert_code(&c.check("GET", "/v1/events", r).await, "invalid_query");
    let r = send(
        &app,
        Method::GET,
        &format!("/v1/events/{event_id}"),
        k,
        None,
    )
    .await;
    c.check("GET", "/v1/events/{id}", r).await;
    let r = send(&app, Method::GET, "/v1/events/evt_nope", k, None).await;
    c.check("GET", "/v1/events/{id}", r).await;
    let redeliver = format!("/v1/events/{event_id}/redeliver");
    let r = send(&app, Method::POST, &redeliver, k, None).await;
    c.check("POST", "/v1/events/{id}/redeliver", r).await;
    let r = send(&app, Method::POST, "/v1/events/evt_nope/redeliver", k, None).await;
    c.check("POST", "/v1/events/{id}/redeliver", r).await;
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v1/webhook-endpoints/{ep_id}"),
        k,
        None,
    )
    .await;
    assert_eq!(r.status(), 204);
    c.check("DELETE", "/v1/webhook-endpoints/{id}", r).await;

    // D1's side: client credentials, then a notification for a second token.
    let oauth = |auth: Option<(&str, &str)>, form: &'static str| {
        let mut rb = app
            .client
            .post(app.url("/oauth2/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        if let Some((id, secret)) = auth {
            rb = rb.basic_auth(id, Some(secret));
        }
        rb.send()
    };
    let r = oauth(Some((D1_CLIENT, "wrong")), "grant_type=client_credentials")
        .await
        .unwrap();
    assert_eq!(
        c.check("POST", "/oauth2/token", r).await["error"],
        "invalid_client"
    );
    let r = oauth(Some((D1_CLIENT, D1_SECRET)), "grant_type=password")
        .await
        .unwrap();
    c.check("POST", "/oauth2/token", r).await;
    let r = oauth(
        Some((D1_CLIENT, D1_SECRET)),
        "grant_type=client_credentials",
    )
    .await
    .unwrap();
    let token = c.check("POST", "/oauth2/token", r).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = send(
        &app,
        Method::POST,
        "/v1/tokens",
        k,
        Some(card_body("378282246310005", 12, 2030)),
    )
    .await;
    let t2 = c.check("POST", "/v1/tokens", r).await;
    let d1_merchant = m["d1MerchantId"].as_str().unwrap();
    let d1_token = t2["networkToken"]["id"].as_str().unwrap();
    let notify_template = "/merchant-gateways/{merchant_gateway_id}/merchants/{merchant_id}/tokens/{token_id}/notify-update";
    let notify_path = |mgid: &str| {
        format!("/merchant-gateways/{mgid}/merchants/{d1_merchant}/tokens/{d1_token}/notify-update")
    };
    let event = json!({"eventId": "drift-evt-1", "eventType": "STATUS_UPDATE",
        "timestamp": "2026-01-01T00:00:00Z", "tokenId": d1_token, "status": "SUSPENDED"});
    let r = send(
        &app,
        Method::POST,
        &notify_path(MGID),
        None,
        Some(event.clone()),
    )
    .await;
    assert_code(&c.check("POST", notify_template, r).await, "unauthorized");
    let r = send(
        &app,
        Method::POST,
        &notify_path("other-mgid"),
        Some(&token),
        Some(event.clone()),
    )
    .await;
    c.check("POST", notify_template, r).await;
    let r = send(
        &app,
        Method::POST,
        &notify_path(MGID),
        Some(&token),
        Some(event),
    )
    .await;
    assert_eq!(r.status(), 204);
    c.check("POST", notify_template, r).await;

    // The issuer side (docs/issuer.md): every route once, answers held against the document.
    let r = send(
        &app,
        Method::POST,
        "/v1/issuers",
        Some(ADMIN),
        Some(json!({"name": "Bank", "d1IssuerId": "short"})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/issuers", r).await,
        "invalid_d1_issuer_id",
    );
    let r = send(
        &app,
        Method::POST,
        "/v1/issuers",
        Some(ADMIN),
        Some(json!({"name": "Bank", "d1IssuerId": "DRIFT00001"})),
    )
    .await;
    let iss = c.check("POST", "/v1/issuers", r).await;
    let ikey = iss["apiKey"].as_str().unwrap().to_owned();
    let iss_path = format!("/v1/issuers/{}", iss["id"].as_str().unwrap());
    let r = send(&app, Method::GET, "/v1/issuers", Some(ADMIN), None).await;
    c.check("GET", "/v1/issuers", r).await;
    let r = send(&app, Method::GET, &iss_path, Some(ADMIN), None).await;
    c.check("GET", "/v1/issuers/{id}", r).await;
    let r = send(
        &app,
        Method::POST,
        &format!("{iss_path}/api-keys"),
        Some(ADMIN),
        Some(json!({"name": "pii", "scopes": ["issuer:click-to-pay", "issuer:click-to-pay:pii"]})),
    )
    .await;
    c.check("POST", "/v1/issuers/{id}/api-keys", r).await;
    let seed = format!(
        "{}/sim/issuers/DRIFT00001/cards/drift-card",
        app.sim_control.as_ref().unwrap()
    );
    let r = app
        .client
        .put(seed)
        .json(&json!({"pan": "4111111111111111", "expiry": "1230", "consumerId": "drift-cons"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let enrol = "/v1/issuer/cards/{card_id}/click-to-pay/enrolment";
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/click-to-pay/enrolment",
        Some(&ikey),
        Some(json!({"cardholderName": "A".repeat(27)})),
    )
    .await;
    assert_code(&c.check("POST", enrol, r).await, "invalid_cardholder_name");
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/click-to-pay/enrolment",
        Some(&key),
        Some(json!({"cardholderName": "A"})),
    )
    .await;
    assert_code(&c.check("POST", enrol, r).await, "insufficient_scope");
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/click-to-pay/enrolment",
        Some(&ikey),
        Some(json!({"cardholderName": "ADA LOVELACE"})),
    )
    .await;
    let op = c.check("POST", enrol, r).await;
    let op_id = op["id"].as_str().unwrap().to_owned();
    let r = send(
        &app,
        Method::GET,
        &format!("/v1/issuer/operations/{op_id}"),
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", "/v1/issuer/operations/{operation_id}", r)
        .await;
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/operations/op_nope",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(
        &c.check("GET", "/v1/issuer/operations/{operation_id}", r)
            .await,
        "operation_not_found",
    );
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/operations?cardId=drift-card&limit=1",
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", "/v1/issuer/operations", r).await;
    // The issuer's audit trail (the enrolments above are in it) and its refusals.
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/audit-events?limit=2",
        Some(&ikey),
        None,
    )
    .await;
    let page = c.check("GET", "/v1/issuer/audit-events", r).await;
    assert_eq!(page["data"][0]["action"], "click_to_pay.enrol");
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/audit-events?cursor=nope",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(
        &c.check("GET", "/v1/issuer/audit-events", r).await,
        "invalid_cursor",
    );
    // Client certificates bound to the issuer (admin).
    let icerts = "/v1/issuers/{id}/client-certs";
    let icerts_path = format!("{iss_path}/client-certs");
    let r = send(&app, Method::GET, &icerts_path, Some(ADMIN), None).await;
    assert_eq!(c.check("GET", icerts, r).await["authMode"], "API_KEY");
    let r = send(
        &app,
        Method::PUT,
        &icerts_path,
        Some(ADMIN),
        Some(json!({"authMode": "API_KEY", "certificates": [{"sha256": "cd".repeat(32), "name": "bank"}]})),
    )
    .await;
    assert_eq!(
        c.check("PUT", icerts, r).await["issuerId"],
        iss["id"].as_str().unwrap()
    );
    let r = send(
        &app,
        Method::PUT,
        &icerts_path,
        Some(ADMIN),
        Some(json!({"authMode": "CERT", "certificates": [{"sha256": "cd".repeat(32)}]})),
    )
    .await;
    assert_code(&c.check("PUT", icerts, r).await, "invalid_auth_mode");
    let r = send(
        &app,
        Method::GET,
        "/v1/issuers/iss_AAAAAAAAAAAAAAAA/client-certs",
        Some(ADMIN),
        None,
    )
    .await;
    assert_code(&c.check("GET", icerts, r).await, "issuer_not_found");
    // Physical card orders: an order, a batch with a bad item, the production status.
    let order = |id: &str| {
        json!({"issuerRequestId": id, "distributionChannel": "INSTANT",
            "card": {"pan": "4111111111111111", "exp": "1230", "cvc": "737", "cardholderName": "ADA LOVELACE"},
            "services": {"productId": "P1", "issuanceLocation": "BRANCH-1"}})
    };
    let orders = "/v1/issuer/cards/{card_id}/production-orders";
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/production-orders",
        Some(&ikey),
        Some(order("drift-order")),
    )
    .await;
    c.check("POST", orders, r).await;
    let mut bad = order("drift-bad");
    bad["distributionChannel"] = json!("THALES");
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/production-orders",
        Some(&ikey),
        Some(bad),
    )
    .await;
    assert_code(
        &c.check("POST", orders, r).await,
        "invalid_production_order",
    );
    let mut item = order("drift-b1");
    item["cardId"] = json!("drift-b");
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/production-orders/batch",
        Some(&ikey),
        Some(json!({"orders": [item, {"cardId": "x"}]})),
    )
    .await;
    c.check("POST", "/v1/issuer/production-orders/batch", r)
        .await;
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/production-orders/batch",
        Some(&ikey),
        Some(json!({"orders": []})),
    )
    .await;
    assert_code(
        &c.check("POST", "/v1/issuer/production-orders/batch", r)
            .await,
        "invalid_batch_size",
    );
    let status = "/v1/issuer/cards/{card_id}/production-status";
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/drift-card/production-status",
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", status, r).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/never-ordered/production-status",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(
        &c.check("GET", status, r).await,
        "production_order_not_found",
    );
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/drift-card/click-to-pay/profiles",
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", "/v1/issuer/cards/{card_id}/click-to-pay/profiles", r)
        .await;
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/consumers/drift-cons/click-to-pay/profiles",
        Some(&ikey),
        None,
    )
    .await;
    c.check(
        "GET",
        "/v1/issuer/consumers/{consumer_id}/click-to-pay/profiles",
        r,
    )
    .await;
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/click-to-pay/update",
        Some(&ikey),
        Some(json!({"cardholderName": "A LOVELACE"})),
    )
    .await;
    c.check("POST", "/v1/issuer/cards/{card_id}/click-to-pay/update", r)
        .await;
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/consumers/drift-cons/click-to-pay/update",
        Some(&ikey),
        Some(json!({"reason": "new address"})),
    )
    .await;
    c.check(
        "POST",
        "/v1/issuer/consumers/{consumer_id}/click-to-pay/update",
        r,
    )
    .await;
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/cards/drift-card/click-to-pay/opt-out",
        Some(&ikey),
        Some(json!({})),
    )
    .await;
    c.check("POST", "/v1/issuer/cards/{card_id}/click-to-pay/opt-out", r)
        .await;
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/consumers/bad%20id/click-to-pay/opt-out",
        Some(&ikey),
        Some(json!({})),
    )
    .await;
    assert_code(
        &c.check(
            "POST",
            "/v1/issuer/consumers/{consumer_id}/click-to-pay/opt-out",
            r,
        )
        .await,
        "invalid_consumer_id",
    );
    let r = send(
        &app,
        Method::POST,
        "/v1/issuer/webhook-endpoints",
        Some(&ikey),
        Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["issuer.operation.succeeded"]})),
    )
    .await;
    let ep = c.check("POST", "/v1/issuer/webhook-endpoints", r).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/webhook-endpoints",
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", "/v1/issuer/webhook-endpoints", r).await;
    let r = send(&app, Method::GET, "/v1/issuer/events", Some(&ikey), None).await;
    c.check("GET", "/v1/issuer/events", r).await;
    let r = send(
        &app,
        Method::DELETE,
        &format!(
            "/v1/issuer/webhook-endpoints/{}",
            ep["id"].as_str().unwrap()
        ),
        Some(&ikey),
        None,
    )
    .await;
    c.check("DELETE", "/v1/issuer/webhook-endpoints/{id}", r)
        .await;
    let item = json!({"operations": [{"operationId": op["d1OperationId"], "operation": "CLICK_TO_PAY_ENROLMENT", "status": "SUCCESSFUL", "startTime": "2026-01-01T00:00:00Z", "cardId": "drift-card"}]});
    for (variant, d1) in [
        ("cards", "DRIFT00001"),
        ("consumers", "DRIFT00001"),
        ("cards", "NOBODY0001"),
    ] {
        let r = send(
            &app,
            Method::POST,
            &format!("/notifications/d1/v2/issuers/{d1}/{variant}"),
            Some(&token),
            Some(item.clone()),
        )
        .await;
        c.check(
            "POST",
            &format!("/notifications/d1/v2/issuers/{{issuer_id}}/{variant}"),
            r,
        )
        .await;
    }

    // The issuer's cards: a known card, an unknown one, a malformed id, and a deletion.
    let card = "/v1/issuer/cards/{card_id}";
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/drift-card",
        Some(&ikey),
        None,
    )
    .await;
    c.check("GET", card, r).await;
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/never-known",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(&c.check("GET", card, r).await, "issuer_card_not_found");
    let r = send(
        &app,
        Method::GET,
        "/v1/issuer/cards/bad%20id",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(&c.check("GET", card, r).await, "invalid_card_id");
    let r = send(
        &app,
        Method::DELETE,
        "/v1/issuer/cards/bad%20id",
        Some(&ikey),
        None,
    )
    .await;
    assert_code(&c.check("DELETE", card, r).await, "invalid_card_id");
    let r = send(
        &app,
        Method::DELETE,
        "/v1/issuer/cards/drift-card",
        Some(&ikey),
        None,
    )
    .await;
    c.check("DELETE", card, r).await;

    // Metrics last, so it has seen the traffic above.
    let r = send(&app, Method::GET, "/metrics", None, None).await;
    let text = c.check("GET", "/metrics", r).await;
    assert!(
        text.as_str()
            .unwrap()
            .contains("tokengate_http_requests_total"),
        "{text}"
    );

    // Every operation of the document was exercised above, so each one's schemas have been held
    // against real answers.
    let exercised: BTreeSet<(String, String)> = c
        .seen
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    let documented = c.operations();
    let missing: Vec<_> = documented.difference(&exercised).collect();
    assert!(
        missing.is_empty(),
        "documented but never exercised: {missing:?}"
    );
}

/// The `.route("...")` paths of the router, read from the source of src/http. A router built
/// some other way (`nest`, `merge` of another router) fails the test rather than slip by.
fn routed_paths() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&file).unwrap();
        for banned in [".nest(", ".nest_service(", ".merge("] {
            assert!(
                !src.contains(banned),
                "{}: `{banned}` is not understood by this test; teach routed_paths() about it",
                file.display()
            );
        }
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = rest[i + ".route(".len()..].trim_start();
            let lit = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .map(|(p, _)| p.to_owned())
                .unwrap_or_else(|| panic!("{}: .route( without a literal path", file.display()));
            paths.insert(lit);
        }
    }
    assert!(paths.contains("/v1/tokens"), "source scan found {paths:?}");
    paths
}

/// Fills `{param}` segments with a value no route treats specially.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "x1"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_route_exists() {
    let app = TestApp::start(Backend::Embedded).await;
    let c = Contract::fetch(&app).await;
    let documented = c.operations();
    let doc_paths: BTreeSet<String> = documented.iter().map(|(_, p)| p.clone()).collect();

    // Every path of the router is in the document.
    let routed = routed_paths();
    let undocumented: Vec<_> = routed.difference(&doc_paths).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );

    // For every path, the methods the router accepts are exactly the documented ones: an
    // undocumented method answers 405, a documented one anything but 405 or 404 route_not_found.
    // No credentials are sent, so nothing is changed by these probes.
    let mut answers: BTreeMap<(String, String), u16> = BTreeMap::new();
    for path in &routed {
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let r = app
                .client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    app.url(&concrete(path)),
                )
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            let is_doc = documented.contains(&(method.to_owned(), path.clone()));
            if is_doc {
                assert!(
                    status != 405 && !body.contains("route_not_found"),
                    "{method} {path} is documented but not routed ({status})"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is routed but not documented: {body}"
                );
            }
            answers.insert((method.to_owned(), path.clone()), status);
        }
    }
    // And the document lists nothing the router does not serve.
    for (method, path) in &documented {
        assert!(
            answers.contains_key(&(method.clone(), path.clone())),
            "{method} {path} is documented but no `.route(\"{path}\")` exists"
        );
    }
}

/// What OpenAPI tooling refuses or skips, checked on the document itself (no server needed):
/// validators reject an operation that repeats a parameter, and client generators drop it
/// (issue 14: 14 of 28 operations were dropped for a doubled `{id}`, which the drift test above
/// read past). scripts/check-openapi.sh asks the third-party tools themselves.
#[test]
fn parameters_and_operation_ids_are_what_generators_need() {
    let doc: Value = serde_json::from_str(tokengate::http::openapi::document()).unwrap();
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved {r}"))
                .clone(),
            None => v.clone(),
        }
    };
    let mut problems = Vec::new();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut count = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let shared: Vec<Value> = item["parameters"]
            .as_array()
            .map(|a| a.iter().map(&resolve).collect())
            .unwrap_or_default();
        for (method, op) in item.as_object().unwrap() {
            if ![
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                continue;
            }
            count += 1;
            let name = format!("{} {path}", method.to_ascii_uppercase());
            match op["operationId"].as_str() {
                None | Some("") => problems.push(format!("{name}: no operationId")),
                Some(id) => {
                    if let Some(other) = ids.insert(id.to_owned(), name.clone()) {
                        problems.push(format!("{name}: operationId {id} also on {other}"));
                    }
                }
            }
            let own: Vec<Value> = op["parameters"]
                .as_array()
                .map(|a| a.iter().map(&resolve).collect())
                .unwrap_or_default();
            // A repeat within either list is invalid; the operation's own parameters override
            // the path item's with the same (name, in), so the merged set is what a client sees.
            let mut merged: BTreeMap<(String, String), Value> = BTreeMap::new();
            for list in [&shared, &own] {
                let mut seen = BTreeSet::new();
                for p in list {
                    let key = (
                        p["name"].as_str().unwrap_or("").to_owned(),
                        p["in"].as_str().unwrap_or("").to_owned(),
                    );
                    if !seen.insert(key.clone()) {
                        problems.push(format!("{name}: parameter {key:?} repeated"));
                    }
                    merged.insert(key, p.clone());
                }
            }
            let mut names = BTreeSet::new();
            for ((pname, pin), p) in &merged {
                if !names.insert(pname) {
                    problems.push(format!("{name}: parameter `{pname}` in two places"));
                }
                if pin == "path" && p["required"] != true {
                    problems.push(format!("{name}: path parameter `{pname}` not required"));
                }
                if !p["schema"].is_object() {
                    problems.push(format!("{name}: parameter `{pname}` has no schema"));
                }
                if p["description"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{name}: parameter `{pname}` has no description"));
                }
            }
            // Path parameters declared are exactly the template's.
            let template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let declared: BTreeSet<&str> = merged
                .keys()
                .filter(|(_, pin)| pin == "path")
                .map(|(n, _)| n.as_str())
                .collect();
            if template != declared {
                problems.push(format!(
                    "{name}: path parameters {declared:?}, template has {template:?}"
                ));
            }
            for (status, resp) in op["responses"].as_object().into_iter().flatten() {
                for (media, spec) in resolve(resp)["content"].as_object().into_iter().flatten() {
                    if !spec["schema"].is_object() {
                        problems.push(format!("{name} {status} {media}: no schema"));
                    }
                }
            }
        }
    }
    assert!(count >= 28, "only {count} operations in the document");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The human list of problem codes (docs/api.md, "Errors") is the whole catalogue.
#[test]
fn every_problem_code_is_in_the_api_docs() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let missing: Vec<&str> = tokengate::http::problem::codes::ALL
        .iter()
        .map(|p| p.code)
        .filter(|c| !docs.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "codes missing from docs/api.md: {missing:?}"
    );
}
