//! Customer wallets end to end (`GET`/`DELETE /v1/tokens?customerReference=...`), on the
//! embedded store, Redis and a Redis Cluster, with the D1 simulator: listing with pagination,
//! status filter and merchant isolation; delete-all through D1, idempotent, with a partial
//! failure reported; never a card number in an answer.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::support::app::{Backend, TestApp, card_body, expect_problem};

const CARDS: [&str; 4] = [
    "4111111111111111",
    "5555555555554444",
    "4012888888881881",
    "5105105105105100",
];

macro_rules! all_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Embedded).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Redis).await })*
        }
        mod redis_cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::RedisCluster).await })*
        }
    };
}

all_backends!(
    wallet_lists_pages_filters_and_isolates,
    wallet_refuses_bad_queries,
    wallet_delete_goes_through_d1_and_is_idempotent,
    wallet_delete_reports_partial_failures,
);

/// Tokenizes `pan` for `customer`; returns the token.
async fn tokenize_for(app: &TestApp, key: &str, pan: &str, customer: &str) -> Value {
    let mut body = card_body(pan, 12, 2030);
    body["customerReference"] = json!(customer);
    let r = app.post("/v1/tokens", key, &body).await;
    assert_eq!(r.status(), 201, "tokenize");
    r.json().await.unwrap()
}

/// A response's text, checked for card numbers.
async fn text_without_pan(r: reqwest::Response) -> String {
    let text = r.text().await.unwrap();
    for pan in CARDS {
        assert!(!text.contains(pan), "a card number in a response: {text}");
    }
    text
}

/// `GET /v1/tokens?...`: status 200 and the page.
async fn list(app: &TestApp, key: &str, query: &str) -> Value {
    let r = app.get(&format!("/v1/tokens?{query}"), key).await;
    assert_eq!(r.status(), 200, "list {query}");
    serde_json::from_str(&text_without_pan(r).await).unwrap()
}

/// Every token id of the customer's wallet, walked with `limit`, in the order answered.
async fn walk(app: &TestApp, key: &str, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("{query}&limit={limit}");
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={c}"));
        }
        let page = list(app, key, &q).await;
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit);
        ids.extend(data.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

/// `DELETE /v1/tokens?customerReference=<customer>` (`customer`: URL-safe characters only).
async fn delete_all(
    app: &TestApp,
    key: &str,
    customer: &str,
    idem: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .client
        .delete(app.url(&format!("/v1/tokens?customerReference={customer}")))
        .bearer_auth(key);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

async fn status_of(app: &TestApp, key: &str, id: &str) -> String {
    let v: Value = app
        .get(&format!("/v1/tokens/{id}"), key)
        .await
        .json()
        .await
        .unwrap();
    v["status"].as_str().unwrap().to_owned()
}

fn id_list(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

async fn wallet_lists_pages_filters_and_isolates(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    let (_, other_key) = app.create_merchant("Other").await;
    // A reference with characters that need encoding, and keys would not like.
    let customer = "cust 42/{m:x}+é";
    let mut mine = Vec::new();
    for pan in &CARDS[..3] {
        mine.push(tokenize_for(&app, &key, pan, customer).await);
    }
    let someone_else = tokenize_for(&app, &key, CARDS[3], "cust-7").await;
    let theirs = tokenize_for(&app, &other_key, CARDS[0], customer).await;
    let q = format!(
        "customerReference={}",
        customer
            .bytes()
            .map(|c| format!("%{c:02X}"))
            .collect::<String>()
    );

    // Newest first: creation time (ms) descending, ties by id descending.
    let ms = |t: &Value| {
        let at = time::OffsetDateTime::parse(
            t["createdAt"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        at.unix_timestamp_nanos() / 1_000_000
    };
    let mut expected: Vec<(i128, String)> = mine
        .iter()
        .map(|t| (ms(t), t["id"].as_str().unwrap().to_owned()))
        .collect();
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    for limit in [1, 2, 3, 20] {
        assert_eq!(walk(&app, &key, &q, limit).await, expected, "limit {limit}");
    }
    // The items are the single-token view, exactly.
    let page = list(&app, &key, &format!("{q}&limit=1")).await;
    let first = &page["data"][0];
    let single: Value = app
        .get(
            &format!("/v1/tokens/{}", first["id"].as_str().unwrap()),
            &key,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first, &single);
    assert_eq!(first["customerReference"], customer);
    assert!(page["nextCursor"].is_string());

    // Status filter follows lifecycle changes.
    let suspended = mine[1]["id"].as_str().unwrap();
    let r = app
        .post(&format!("/v1/tokens/{suspended}/suspend"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        walk(&app, &key, &format!("{q}&status=SUSPENDED"), 5).await,
        [suspended]
    );
    let active = walk(&app, &key, &format!("{q}&status=ACTIVE"), 5).await;
    assert_eq!(active.len(), 2);
    assert!(!active.contains(&suspended.to_owned()));
    assert!(
        walk(&app, &key, &format!("{q}&status=DELETED"), 5)
            .await
            .is_empty()
    );

    // Isolation: the other customer, the other merchant.
    assert_eq!(
        walk(&app, &key, "customerReference=cust-7", 5).await,
        [someone_else["id"].as_str().unwrap()]
    );
    assert_eq!(
        walk(&app, &other_key, &q, 5).await,
        [theirs["id"].as_str().unwrap()]
    );
    assert!(
        walk(&app, &key, "customerReference=nobody", 5)
            .await
            .is_empty()
    );
}

async fn wallet_refuses_bad_queries(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    tokenize_for(&app, &key, CARDS[0], "cust-42").await;
    for (query, status, code) in [
        ("", 400, "invalid_query"),
        ("?limit=5", 400, "invalid_query"),
        (
            "?customerReference=cust-42&status=FROZEN",
            400,
            "invalid_query",
        ),
        ("?customerReference=cust-42&limit=0", 400, "invalid_query"),
        ("?customerReference=cust-42&limit=101", 400, "invalid_query"),
        (
            "?customerReference=cust-42&customerReference=x",
            400,
            "invalid_query",
        ),
        ("?customerReference=cust-42&sort=asc", 400, "invalid_query"),
        ("?customerReference=%ZZ", 400, "invalid_query"),
        ("?customerReference=", 422, "invalid_customer_reference"),
        (
            "?customerReference=a%0Ab",
            422,
            "invalid_customer_reference",
        ),
        (
            "?customerReference=cust-42&cursor=nope",
            422,
            "invalid_cursor",
        ),
        (
            "?customerReference=cust-42&cursor=(019b7ca98d03-tok_d7XXXyQu2WZRKlyWvsMJRA",
            422,
            "invalid_cursor",
        ),
    ] {
        let r = app.get(&format!("/v1/tokens{query}"), &key).await;
        expect_problem(r, status, code).await;
    }
    // The delete takes the customer alone; a filter or a typo never widens it.
    for (query, status, code) in [
        ("", 400, "invalid_query"),
        (
            "?customerReference=cust-42&status=ACTIVE",
            400,
            "invalid_query",
        ),
        ("?customerRef=cust-42", 400, "invalid_query"),
        ("?customerReference=", 422, "invalid_customer_reference"),
    ] {
        let r = app
            .client
            .delete(app.url(&format!("/v1/tokens{query}")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        expect_problem(r, status, code).await;
    }
    let r = app
        .client
        .delete(app.url("/v1/tokens?customerReference=cust-42"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "has space")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_idempotency_key").await;
    // Nothing was deleted by any of these.
    assert_eq!(
        walk(&app, &key, "customerReference=cust-42&status=ACTIVE", 5)
            .await
            .len(),
        1
    );
}

async fn wallet_delete_goes_through_d1_and_is_idempotent(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    let mut mine = Vec::new();
    for pan in &CARDS[..3] {
        mine.push(tokenize_for(&app, &key, pan, "cust-42").await);
    }
    let kept = tokenize_for(&app, &key, CARDS[3], "cust-7").await;
    let d1_deletes = |s: &Value| s["requests"]["delete"].as_u64().unwrap();
    let before = d1_deletes(&app.sim_stats().await);

    let r = delete_all(&app, &key, "cust-42", Some("forget-42")).await;
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&text_without_pan(r).await).unwrap();
    assert_eq!(v["customerReference"], "cust-42");
    assert_eq!(v["failed"], json!([]));
    assert_eq!(v["complete"], true);
    let deleted: HashSet<String> = id_list(&v["deleted"]).into_iter().collect();
    let expected: HashSet<String> = mine
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deleted, expected);
    // Each through D1, then recorded as DELETED.
    assert_eq!(d1_deletes(&app.sim_stats().await), before + 3);
    for id in &expected {
        assert_eq!(status_of(&app, &key, id).await, "DELETED");
    }
    assert_eq!(
        status_of(&app, &key, kept["id"].as_str().unwrap()).await,
        "ACTIVE"
    );
    // The wallet still lists the tombstones, under DELETED only.
    assert_eq!(
        walk(&app, &key, "customerReference=cust-42&status=DELETED", 2)
            .await
            .len(),
        3
    );
    assert!(
        walk(&app, &key, "customerReference=cust-42&status=ACTIVE", 2)
            .await
            .is_empty()
    );

    // The same key replays the finished answer; no D1 call.
    let r = delete_all(&app, &key, "cust-42", Some("forget-42")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let replay: Value = r.json().await.unwrap();
    assert_eq!(replay, v);
    // A new call finds nothing left to delete, and says so.
    let r = delete_all(&app, &key, "cust-42", None).await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["deleted"], json!([]));
    assert_eq!(again["failed"], json!([]));
    assert_eq!(again["complete"], true);
    assert_eq!(d1_deletes(&app.sim_stats().await), before + 3);
    // A customer without tokens: the same empty answer.
    let r = delete_all(&app, &key, "nobody", None).await;
    assert_eq!(r.status(), 200);

    // Audited like single deletes: one token.delete per token.
    let r = app.get("/v1/audit-events?limit=100", &key).await;
    let trail: Value = r.json().await.unwrap();
    let audited: HashSet<String> = trail["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "token.delete" && e["outcome"] == "success")
        .map(|e| e["tokenId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audited, expected);
}

async fn wallet_delete_reports_partial_failures(b: Backend) {
    let app = TestApp::builder(b)
        .env("TOKENGATE__D1__CALL_TIMEOUT_MS", "400")
        .env("TOKENGATE__D1__MAX_RETRIES", "0")
        .env("TOKENGATE__D1__BREAKER_OPEN_MS", "100")
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    let active = tokenize_for(&app, &key, CARDS[0], "cust-42").await;
    let active = active["id"].as_str().unwrap().to_owned();
    // A reservation D1 never answered: PENDING, no network token, so deleting it needs no D1.
    app.sim_faults(json!({"latency": {"fixedMs": 1500}, "operations": ["createToken"]}))
        .await;
    let mut body = card_body(CARDS[1], 12, 2030);
    body["customerReference"] = json!("cust-42");
    let r = app.post("/v1/tokens", &key, &body).await;
    expect_problem(r, 504, "d1_timeout").await;
    let pending = walk(&app, &key, "customerReference=cust-42&status=PENDING", 5).await;
    assert_eq!(pending.len(), 1);
    let pending = pending[0].clone();

    // D1 refuses every delete: the pending token is deleted, the active one is reported.
    app.sim_faults(json!({"errorRates": {"503": 1.0}, "operations": ["delete"]}))
        .await;
    let r = delete_all(&app, &key, "cust-42", Some("forget-42")).await;
    assert_eq!(r.status(), 207);
    let v: Value = serde_json::from_str(&text_without_pan(r).await).unwrap();
    assert_eq!(id_list(&v["deleted"]), vec![pending.clone()]);
    assert_eq!(v["failed"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["failed"][0]["id"], active.as_str());
    assert_eq!(v["failed"][0]["status"], 503);
    assert_eq!(v["failed"][0]["code"], "d1_unavailable");
    assert_eq!(status_of(&app, &key, &active).await, "ACTIVE");
    assert_eq!(status_of(&app, &key, &pending).await, "DELETED");

    // D1 back: retrying with the same key continues the job (a 207 is not replayed).
    app.sim_faults(json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = delete_all(&app, &key, "cust-42", Some("forget-42")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(id_list(&v["deleted"]), vec![active.clone()]);
    assert_eq!(v["failed"], json!([]));
    assert_eq!(status_of(&app, &key, &active).await, "DELETED");
    // Now finished: the same key replays it.
    let r = delete_all(&app, &key, "cust-42", Some("forget-42")).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");

    // The failure is in the trail too, with its problem code.
    let trail: Value = app
        .get("/v1/audit-events?limit=100", &key)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        trail["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "token.delete"
                && e["tokenId"] == active.as_str()
                && e["outcome"] == "d1_unavailable"),
        "{trail}"
    );
}

/// A gateway upgraded over a token stored before the wallet index existed. While the index
/// backfill has not run (another instance holds its lease), a list says `indexComplete: false`
/// and a delete-all is refused (503 `wallet_index_building`, `Retry-After`) with nothing
/// deleted, never a `complete: true` that leaves the old token behind. Once the lease is free,
/// the backfill indexes the token and the delete-all deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_delete_waits_for_the_index_backfill() {
    use sha2::{Digest, Sha256};
    let app = TestApp::start(Backend::Redis).await;
    let (merchant, key) = app.create_merchant("Upgraded").await;
    let old = tokenize_for(&app, &key, CARDS[0], "cust-old").await;
    let old_id = old["id"].as_str().unwrap().to_owned();
    let (_, redis) = app.stop().await;
    let redis = redis.unwrap();

    // What an older build left: no wallet entries, no backfill progress; and the backfill
    // lease held by another (busy) instance.
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let wallet = format!(
        "tg:{{m:{merchant}}}:cust:{}",
        hex::encode(Sha256::digest(b"cust-old"))
    );
    ::redis::cmd("HDEL")
        .arg(format!("tg:{{m:{merchant}}}:tok:{old_id}"))
        .arg("w")
        .arg("o")
        .exec(&mut conn)
        .unwrap();
    for k in [
        wallet.clone(),
        format!("{wallet}:ACTIVE"),
        "tg:job:{wallet-index-backfill}".to_owned(),
    ] {
        ::redis::cmd("DEL").arg(k).exec(&mut conn).unwrap();
    }
    ::redis::cmd("SET")
        .arg("tg:lease:{wallet-index-backfill}")
        .arg("another-instance")
        .arg("PX")
        .arg(600_000)
        .exec(&mut conn)
        .unwrap();

    let app = TestApp::builder(Backend::Redis)
        .redis_server(redis)
        .start()
        .await;
    let page = list(&app, &key, "customerReference=cust-old").await;
    assert_eq!(page["indexComplete"], false, "{page}");
    assert!(page["data"].as_array().unwrap().is_empty(), "{page}");
    let r = delete_all(&app, &key, "cust-old", Some("forget-old")).await;
    assert!(r.headers().get("retry-after").is_some());
    expect_problem(r, 503, "wallet_index_building").await;
    assert_eq!(status_of(&app, &key, &old_id).await, "ACTIVE");

    // The other instance goes away: this one takes the lease over and indexes the token.
    ::redis::cmd("DEL")
        .arg("tg:lease:{wallet-index-backfill}")
        .exec(&mut conn)
        .unwrap();
    let mut page = Value::Null;
    for _ in 0..100 {
        page = list(&app, &key, "customerReference=cust-old").await;
        if page["indexComplete"] == true {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(page["indexComplete"], true, "{page}");
    assert_eq!(page["data"][0]["id"], old_id.as_str());
    // The same Idempotency-Key: the refusal was not kept, so the job runs now.
    let r = delete_all(&app, &key, "cust-old", Some("forget-old")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(id_list(&v["deleted"]), [old_id.as_str()]);
    assert_eq!(v["complete"], true);
    assert_eq!(status_of(&app, &key, &old_id).await, "DELETED");
}
