//! `GET /metrics`: after real traffic (sandbox mode, through the D1 simulator) the Prometheus
//! text shows HTTP counters by route template, D1 calls, store operations, token transitions and
//! build info, and never a token id, a PAN, a merchant id or an API key.
//!
//! All gateways of the test process share one recorder (src/observability.rs), and tests run in
//! parallel, so assertions are lower bounds on counters this test drove, and hygiene checks
//! cover everything any test put there.

use serde_json::Value;

use crate::support::app::{Backend, TestApp};

const VISA: &str = "4111111111111111";

/// Sum of the samples of `name` whose labels include every `(key, value)` of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let present: Vec<(String, String)> = label_text
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.trim_matches('"').to_owned()))
            })
            .collect();
        let matches = labels
            .iter()
            .all(|(k, v)| present.iter().any(|(pk, pv)| pk == k && pv == v));
        if matches {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_route_templates_and_no_identifiers() {
    let app = TestApp::start(Backend::Embedded).await;
    let (merchant_id, key) = app.create_merchant("Metrics Co").await;
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    let id = t["id"].as_str().unwrap().to_owned();
    let d1_token = t["networkToken"]["id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let r = app.get(&format!("/v1/tokens/{id}"), &key).await;
        assert_eq!(r.status(), 200);
    }
    let r = app.get("/v1/tokens/tok_BBBBBBBBBBBBBBBBBBBBBB", &key).await;
    assert_eq!(r.status(), 404);
    let r = app.get(&format!("/no/such/route/{id}"), &key).await;
    assert_eq!(r.status(), 404);
    let r = app
        .post(
            &format!("/v1/tokens/{id}/cryptograms"),
            &key,
            &serde_json::json!({"transactionType": "MIT"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let crypto: Value = r.json().await.unwrap();
    let token_number = crypto["tokenNumber"].as_str().unwrap().to_owned();

    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.unwrap();

    // HTTP, by route template.
    let get_token = [
        ("method", "GET"),
        ("route", "/v1/tokens/{id}"),
        ("status", "200"),
    ];
    assert!(
        sample(&text, "tokengate_http_requests_total", &get_token) >= 3.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "tokengate_http_request_duration_seconds_count",
            &get_token
        ) >= 3.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "tokengate_http_request_duration_seconds_bucket",
            &[("route", "/v1/tokens/{id}"), ("le", "+Inf")]
        ) >= 3.0,
        "{text}"
    );
    let not_found = [("route", "/v1/tokens/{id}"), ("status", "404")];
    assert!(sample(&text, "tokengate_http_requests_total", &not_found) >= 1.0);
    let unmatched = [("route", "unmatched"), ("status", "404")];
    assert!(
        sample(&text, "tokengate_http_requests_total", &unmatched) >= 1.0,
        "{text}"
    );
    let created = [
        ("method", "POST"),
        ("route", "/v1/tokens"),
        ("status", "201"),
    ];
    assert!(sample(&text, "tokengate_http_requests_total", &created) >= 1.0);

    // D1 calls, store operations, token transitions, build info.
    let d1_ok = [("operation", "createToken"), ("outcome", "ok")];
    assert!(
        sample(&text, "tokengate_d1_calls_total", &d1_ok) >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "tokengate_d1_call_duration_seconds_count", &d1_ok) >= 1.0);
    let insert = [("operation", "insert_token"), ("outcome", "ok")];
    assert!(
        sample(
            &text,
            "tokengate_store_operation_duration_seconds_count",
            &insert
        ) >= 1.0,
        "{text}"
    );
    let created_pending = [("from", "NONE"), ("to", "PENDING")];
    assert!(sample(&text, "tokengate_token_transitions_total", &created_pending) >= 1.0);
    let activated = [("from", "PENDING"), ("to", "ACTIVE")];
    assert!(
        sample(&text, "tokengate_token_transitions_total", &activated) >= 1.0,
        "{text}"
    );
    assert!(text.contains("# TYPE tokengate_tokens gauge"), "{text}");
    assert!(
        text.contains(&format!(
            "tokengate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );

    // Hygiene: none of this test's identifiers or secrets, and no identifier of any test.
    for secret in [
        VISA,
        id.as_str(),
        merchant_id.as_str(),
        key.as_str(),
        d1_token.as_str(),
        token_number.as_str(),
    ] {
        assert!(!text.contains(secret), "metrics leak an identifier");
    }
    // An identifier starts a word (`mer_NJayePY2ypiUCAIv`); inside a word the same letters are
    // a label value's own (`list_customer_tokens` holds `mer_`), which another test's calls may
    // have put in the shared registry.
    for prefix in ["tok_", "mer_", "tgk_"] {
        let starts_a_word = text.match_indices(prefix).any(|(i, _)| {
            !text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        assert!(!starts_a_word, "metrics carry a `{prefix}` identifier");
    }
    // No long digit runs in any label (PANs, token numbers); sample values are floats and may
    // legitimately have many digits.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map_or("", |(l, _)| l);
        let mut run = 0;
        for c in labels.chars() {
            run = if c.is_ascii_digit() { run + 1 } else { 0 };
            assert!(run < 12, "a 12+ digit run in a label: {line}");
        }
    }
}

/// `tokengate_tokens{status}` is the absolute number of tokens per status in the store (from
/// the store's counts), so a freshly restarted gateway reports the tokens an earlier process
/// wrote. The recorder is shared by every gateway of the test process, so the test polls until
/// this gateway's refresh (every 100 ms here, 15 s for the others) is the one shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_gauge_shows_absolute_counts_after_a_restart() {
    let interval = ("TOKENGATE__METRICS__TOKEN_COUNTS_INTERVAL_MS", "100");
    let app = TestApp::builder(Backend::Embedded)
        .env(interval.0, interval.1)
        .start()
        .await;
    let dir = app.data_dir.clone();
    let (_, key) = app.create_merchant("Gauge Co").await;
    let mut ids = Vec::new();
    for pan in [
        "4111111111111111",
        "5555555555554444",
        "4012888888881881",
        "4000056655665556",
    ] {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let t: Value = r.json().await.unwrap();
        ids.push(t["id"].as_str().unwrap().to_owned());
    }
    let r = app
        .post(
            &format!("/v1/tokens/{}/suspend", ids[0]),
            &key,
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .delete(app.url(&format!("/v1/tokens/{}", ids[1])))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (tmp, _) = app.stop().await;

    // A new process would start with an empty recorder; this one shares it, so what proves
    // the point is that the restarted gateway reports counts it did not write itself.
    let app = TestApp::builder(Backend::Embedded)
        .data_dir(dir)
        .env(interval.0, interval.1)
        .start()
        .await;
    let want = [
        ("ACTIVE", 2.0),
        ("SUSPENDED", 1.0),
        ("DELETED", 1.0),
        ("PENDING", 0.0),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut text;
    loop {
        let r = app.client.get(app.url("/metrics")).send().await.unwrap();
        text = r.text().await.unwrap();
        let ours = want
            .iter()
            .all(|(s, n)| sample(&text, "tokengate_tokens", &[("status", s)]) == *n)
            && sample(&text, "tokengate_token_counts_complete", &[]) == 1.0;
        if ours {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauge never showed the stored counts: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(text.contains("# TYPE tokengate_tokens gauge"), "{text}");
    app.stop().await;
    drop(tmp);
}
