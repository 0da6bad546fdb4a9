//! The access log as a log collector sees it: `log.format = auto` off a terminal gives JSON
//! lines, one per request with method, route template, status, latency and request id, and no
//! token id, PAN or credential. `log.access_sample` thins out successes, never errors.
//!
//! The tests install the gateway's own subscriber (`telemetry::dispatch`) writing into a buffer
//! as the default of the test thread. They run on a current-thread runtime, so the gateway's
//! tasks (and their log events) run on that thread; the rest of the suite keeps logging to the
//! process-wide capture of `support`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokengate::config::{LogConfig, LogFormat};

use crate::support::app::{Backend, TestApp};

/// A test PAN used nowhere else, so finding it in the log means this test leaked it.
const PAN: &str = "4000056655665556";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Every line, each of which must be a JSON object.
    fn json_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn access_lines(&self) -> Vec<Value> {
        self.json_lines()
            .into_iter()
            .filter(|v| v["target"] == "tokengate::access")
            .collect()
    }
}

/// The production subscriber for a process whose stdout is not a terminal, writing into `buf`.
fn capture(buf: &Buf) -> tracing::Dispatch {
    let cfg = LogConfig {
        format: LogFormat::Auto,
        level: "info".into(),
        ..LogConfig::standalone()
    };
    let w = buf.clone();
    tokengate::telemetry::dispatch(&cfg, move || w.clone(), false, false)
}

#[tokio::test]
async fn access_log_is_json_with_request_id_and_route_template_and_no_card_data() {
    let buf = Buf::default();
    let _default = tracing::dispatcher::set_default(&capture(&buf));
    let app = TestApp::start(Backend::Embedded).await;
    let (_, key) = app.create_merchant("Access Log Co").await;
    let r = app.tokenize(&key, PAN).await;
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    let id = t["id"].as_str().unwrap().to_owned();
    let r = app
        .client
        .get(app.url(&format!("/v1/tokens/{id}")))
        .bearer_auth(&key)
        .header("x-request-id", "it-access-log-get")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A client request id holding a card number is not logged as such.
    let r = app
        .client
        .get(app.url("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA"))
        .bearer_auth(&key)
        .header("x-request-id", PAN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A line logged while a request is handled carries its request id and route template.
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth("not-d1", Some("wrong"))
        .header("x-request-id", "it-access-log-inner")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;

    let inner = buf
        .json_lines()
        .into_iter()
        .find(|v| v["message"] == "token request with wrong client credentials")
        .unwrap_or_else(|| panic!("no handler line: {}", buf.text()));
    assert_eq!(
        inner["span"]["request_id"], "it-access-log-inner",
        "{inner}"
    );
    assert_eq!(inner["span"]["route"], "/oauth2/token", "{inner}");

    let lines = buf.access_lines();
    let get = lines
        .iter()
        .find(|v| v["request_id"] == "it-access-log-get")
        .unwrap_or_else(|| panic!("no access line for the GET: {lines:?}"));
    assert_eq!(get["route"], "/v1/tokens/{id}");
    assert_eq!(get["method"], "GET");
    assert_eq!(get["status"], 200);
    assert_eq!(get["level"], "INFO");
    assert!(get["latency_ms"].as_f64().unwrap() >= 0.0, "{get}");
    // Generated request ids are logged too (the tokenize call sent none).
    let post = lines
        .iter()
        .find(|v| v["route"] == "/v1/tokens" && v["method"] == "POST")
        .unwrap_or_else(|| panic!("no access line for the POST: {lines:?}"));
    assert_eq!(post["status"], 201);
    assert_eq!(post["request_id"].as_str().unwrap().len(), 36, "{post}");
    let missing = lines
        .iter()
        .find(|v| v["status"] == 404)
        .unwrap_or_else(|| panic!("no access line for the 404: {lines:?}"));
    assert_eq!(missing["request_id"], "-");

    let text = buf.text();
    assert!(!text.contains(&id), "a token id reached the log");
    assert!(!text.contains(PAN), "a PAN reached the log");
    assert!(!text.contains(&key), "an API key reached the log");
    assert!(!text.contains('\x1b'), "colour codes in a non-terminal log");
}

#[tokio::test]
async fn sampling_drops_successes_but_never_errors() {
    let buf = Buf::default();
    let _default = tracing::dispatcher::set_default(&capture(&buf));
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__LOG__ACCESS_SAMPLE", "0")
        .start()
        .await;
    for _ in 0..3 {
        let r = app.client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;

    let lines = buf.access_lines();
    assert!(
        lines.iter().all(|v| v["status"] != 200),
        "a sampled-out success was logged: {lines:?}"
    );
    let missing = lines
        .iter()
        .find(|v| v["status"] == 404)
        .unwrap_or_else(|| panic!("the 404 was not logged: {lines:?}"));
    // No route matched: the raw path is not logged either.
    assert_eq!(missing["route"], "unmatched");
    assert!(!buf.text().contains("/no/such/route"));
}

#[tokio::test]
async fn access_false_turns_the_access_log_off() {
    let buf = Buf::default();
    let _default = tracing::dispatcher::set_default(&capture(&buf));
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__LOG__ACCESS", "false")
        .start()
        .await;
    let r = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
    assert!(buf.access_lines().is_empty(), "{}", buf.text());
}
