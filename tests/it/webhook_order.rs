//! Integration tests: webhook events of one token (one subject) reach each endpoint in the order
//! they were stored (docs/webhooks.md, "Order per token"), on the embedded store, Redis and a
//! Redis Cluster. Store level: the chains of the outbox (only the head is handed out, a retry
//! holds the subject, done or dead releases it, other subjects and endpoints are not held up,
//! two workers at once). Gateway level: a receiver that fails and then recovers while several
//! events per token are queued, a dead-lettered event that releases its token, and two gateway
//! instances sharing one Redis (standalone and Cluster).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokengate::domain::ports::outbox::{JobNext, OutboxJob, OutboxStore};
use tokengate::domain::token::{MerchantId, TokenId};
use tokengate::domain::webhooks::{EndpointId, EventId, EventType, WebhookEvent, unix_ms};

use crate::support::app::{Backend, TestApp};
use crate::webhooks::{
    Receiver, assert_signed, endpoint, events, eventually, fast, merchant_with_token, post_empty,
};

const RETENTION: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_millis(800);

// --- store level -------------------------------------------------------------------------------

fn event_of(m: &MerchantId, token: Option<&TokenId>, op: Option<&str>) -> WebhookEvent {
    let at = time::OffsetDateTime::now_utc();
    WebhookEvent {
        id: EventId::generate(at),
        merchant_id: m.clone(),
        event_type: EventType::Suspended,
        token_id: token.cloned(),
        operation_id: op.map(str::to_owned),
        created_at: at,
        payload: r#"{"id":"x"}"#.into(),
    }
}

async fn claim(store: &dyn OutboxStore, consumer: &str) -> Vec<OutboxJob> {
    store.claim_jobs(consumer, 50, LEASE).await.unwrap()
}

fn ids(jobs: &[OutboxJob]) -> HashSet<(EventId, EndpointId)> {
    jobs.iter()
        .map(|j| (j.event.clone(), j.endpoint.clone()))
        .collect()
}

fn pair(e: &WebhookEvent, ep: &EndpointId) -> (EventId, EndpointId) {
    (e.id.clone(), ep.clone())
}

/// The store cases, in a module of their own (the gateway cases below use the same backend
/// module names).
mod store {
    use super::{
        only_the_head_of_a_subject_is_handed_out, two_workers_deliver_each_event_once_in_order,
    };
    crate::store_tests!(by_arc:
        only_the_head_of_a_subject_is_handed_out,
        two_workers_deliver_each_event_once_in_order,
    );
}

/// The chain of one token to one endpoint: a later event waits while an earlier one is pending
/// or backing off; done and dead release it; other tokens, events without a subject and the
/// same token's chain to another endpoint do not wait.
async fn only_the_head_of_a_subject_is_handed_out<S: OutboxStore>(store: Arc<S>) {
    let store: &dyn OutboxStore = store.as_ref();
    let m = MerchantId::generate();
    let (w1, w2) = (EndpointId::generate(), EndpointId::generate());
    let (ta, tb) = (TokenId::generate(), TokenId::generate());
    let a: Vec<WebhookEvent> = (0..3).map(|_| event_of(&m, Some(&ta), None)).collect();
    let b = event_of(&m, Some(&tb), None);
    let loose = event_of(&m, None, None);
    let op1 = event_of(&m, None, Some("op_1"));
    let op2 = event_of(&m, None, Some("op_1"));
    for e in &a {
        store
            .enqueue_event(e, &[w1.clone(), w2.clone()], RETENTION)
            .await
            .unwrap();
    }
    for e in [&b, &loose, &op1, &op2] {
        store
            .enqueue_event(e, std::slice::from_ref(&w1), RETENTION)
            .await
            .unwrap();
    }
    // The heads: a[0] to both endpoints, b, the event without a subject, the operation's first.
    let jobs = claim(store, "c1").await;
    assert_eq!(
        ids(&jobs),
        HashSet::from([
            pair(&a[0], &w1),
            pair(&a[0], &w2),
            pair(&b, &w1),
            pair(&loose, &w1),
            pair(&op1, &w1),
        ]),
        "{jobs:?}"
    );
    let job = |e: &WebhookEvent, w: &EndpointId| {
        jobs.iter()
            .find(|j| j.event == e.id && &j.endpoint == w)
            .cloned()
            .unwrap()
    };
    assert_eq!(job(&a[0], &w1).subject, Some(format!("t:{ta}")));
    assert_eq!(job(&loose, &w1).subject, None);

    // a[0] to w1 fails: a retry holds the chain, a[1] is not handed out meanwhile.
    let soon = unix_ms(time::OffsetDateTime::now_utc()) + 300;
    assert!(
        store
            .finish_job(&job(&a[0], &w1), JobNext::Retry { at_ms: soon })
            .await
            .unwrap()
    );
    // a[0] to w2 is delivered: the chain to w2 moves on, w1's does not.
    assert!(
        store
            .finish_job(&job(&a[0], &w2), JobNext::Done)
            .await
            .unwrap()
    );
    for e in [&b, &loose, &op1] {
        assert!(store.finish_job(&job(e, &w1), JobNext::Done).await.unwrap());
    }
    let next = claim(store, "c2").await;
    assert_eq!(
        ids(&next),
        HashSet::from([pair(&a[1], &w2), pair(&op2, &w1)]),
        "{next:?}"
    );
    for j in &next {
        assert!(store.finish_job(j, JobNext::Done).await.unwrap());
    }
    // Finishing a released head again changes nothing (its claim is gone, its chain moved on).
    assert!(
        !store
            .finish_job(&job(&a[0], &w2), JobNext::Done)
            .await
            .unwrap()
    );
    let after_w2 = claim(store, "c2").await;
    assert_eq!(
        ids(&after_w2),
        HashSet::from([pair(&a[2], &w2)]),
        "{after_w2:?}"
    );
    assert!(store.finish_job(&after_w2[0], JobNext::Done).await.unwrap());

    // The retry comes back; dead-lettering it releases a[1], which is delivered, then a[2].
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retried = claim(store, "c1").await;
    assert_eq!(ids(&retried), HashSet::from([pair(&a[0], &w1)]));
    assert_eq!(retried[0].attempts, 1);
    assert!(
        store
            .finish_job(
                &retried[0],
                JobNext::Dead {
                    reason: "http_500".into()
                }
            )
            .await
            .unwrap()
    );
    for want in [&a[1], &a[2]] {
        let got = claim(store, "c1").await;
        assert_eq!(ids(&got), HashSet::from([pair(want, &w1)]), "{got:?}");
        assert!(store.finish_job(&got[0], JobNext::Done).await.unwrap());
    }
    tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
    assert!(claim(store, "c1").await.is_empty(), "everything finished");

    // A head whose worker died is handed out again after the lease, and its finish releases
    // the next event, once.
    let tc = TokenId::generate();
    let c: Vec<WebhookEvent> = (0..2).map(|_| event_of(&m, Some(&tc), None)).collect();
    for e in &c {
        store
            .enqueue_event(e, std::slice::from_ref(&w1), RETENTION)
            .await
            .unwrap();
    }
    let abandoned = claim(store, "dead-worker").await;
    assert_eq!(ids(&abandoned), HashSet::from([pair(&c[0], &w1)]));
    tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
    let taken = claim(store, "c1").await;
    assert_eq!(ids(&taken), HashSet::from([pair(&c[0], &w1)]));
    assert!(store.finish_job(&taken[0], JobNext::Done).await.unwrap());
    assert!(
        !store
            .finish_job(&abandoned[0], JobNext::Done)
            .await
            .unwrap()
    );
    let rest = claim(store, "c1").await;
    assert_eq!(ids(&rest), HashSet::from([pair(&c[1], &w1)]), "{rest:?}");
    assert!(store.finish_job(&rest[0], JobNext::Done).await.unwrap());
    tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
    assert!(claim(store, "c1").await.is_empty());
}

/// Two workers share the queue of 6 tokens x 5 events; one attempt in three fails and is
/// retried. Each event is finished once, no two events of a token are ever held at once, and
/// each token's events are delivered in the order they were stored.
async fn two_workers_deliver_each_event_once_in_order<S: OutboxStore>(store: Arc<S>) {
    let m = MerchantId::generate();
    let w = EndpointId::generate();
    let mut order: HashMap<EventId, (TokenId, usize)> = HashMap::new();
    for _ in 0..6 {
        let t = TokenId::generate();
        for i in 0..5 {
            let e = event_of(&m, Some(&t), None);
            order.insert(e.id.clone(), (t.clone(), i));
            store
                .enqueue_event(&e, std::slice::from_ref(&w), RETENTION)
                .await
                .unwrap();
        }
    }
    let total = order.len();
    let order = Arc::new(order);
    // The delivered events per token, in delivery order; the subjects held right now.
    let delivered: Arc<Mutex<HashMap<TokenId, Vec<usize>>>> = Arc::default();
    let held: Arc<Mutex<HashSet<TokenId>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = |name: &'static str| {
        let (store, order, delivered, held, done) = (
            store.clone(),
            order.clone(),
            delivered.clone(),
            held.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut n = 0u64;
            while done.load(Ordering::SeqCst) < total {
                assert!(std::time::Instant::now() < deadline, "{name}: not finished");
                let jobs = store
                    .claim_jobs(name, 3, Duration::from_secs(30))
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                for j in &jobs {
                    let (t, _) = &order[&j.event];
                    assert!(
                        held.lock().unwrap().insert(t.clone()),
                        "two events of {t} held at once"
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                for j in jobs {
                    n += 1;
                    let (t, i) = order[&j.event].clone();
                    held.lock().unwrap().remove(&t);
                    let next = if n.is_multiple_of(3) {
                        JobNext::Retry {
                            at_ms: unix_ms(time::OffsetDateTime::now_utc()) + 20,
                        }
                    } else {
                        delivered.lock().unwrap().entry(t).or_default().push(i);
                        done.fetch_add(1, Ordering::SeqCst);
                        JobNext::Done
                    };
                    assert!(store.finish_job(&j, next).await.unwrap(), "{name}");
                }
            }
        })
    };
    let (a, b) = (worker("w-a"), worker("w-b"));
    a.await.unwrap();
    b.await.unwrap();
    {
        let delivered = delivered.lock().unwrap();
        assert_eq!(delivered.len(), 6);
        for (t, seq) in delivered.iter() {
            assert_eq!(seq, &[0, 1, 2, 3, 4], "token {t}");
        }
    }
    assert!(
        store
            .claim_jobs("w-a", 10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
}

// --- gateway level -----------------------------------------------------------------------------

crate::backend_tests!(all:
    receiver_down_then_up_delivers_in_order_per_token,
    a_dead_letter_releases_the_token,
);

/// Suspend and resume each token twice through the merchant API: four events per token.
async fn churn(app: &TestApp, key: &str, tokens: &[String]) {
    let mut tasks = Vec::new();
    for t in tokens {
        let (client, base, key, t) = (
            app.client.clone(),
            app.base.clone(),
            key.to_owned(),
            t.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for verb in ["suspend", "resume", "suspend", "resume"] {
                let r = client
                    .post(format!("{base}/v1/tokens/{t}/{verb}"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{verb} {t}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Per token, its events' ids in the order they were stored: by the token's `updatedAt` in
/// each event's frozen body (every change of a token is a compare-and-set on the one before,
/// so this is the order of the writes), read from what the receiver got.
fn stored_order(all: &[Value], rx: &Receiver) -> HashMap<String, Vec<String>> {
    let mut by_token: HashMap<String, Vec<(time::OffsetDateTime, String)>> = HashMap::new();
    for e in all {
        let id = e["id"].as_str().unwrap().to_owned();
        let hit = rx.hits_for(&id).into_iter().next().expect("event sent");
        let body: Value = serde_json::from_str(&hit.body).unwrap();
        let updated = time::OffsetDateTime::parse(
            body["data"]["token"]["updatedAt"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let token = e["tokenId"].as_str().unwrap().to_owned();
        by_token.entry(token).or_default().push((updated, id));
    }
    by_token
        .into_iter()
        .map(|(t, mut v)| {
            v.sort();
            (t, v.into_iter().map(|(_, id)| id).collect())
        })
        .collect()
}

/// Checks that `hits` show each token's events in `want` order, and strictly: no attempt of a
/// later event before the last attempt of an earlier one.
fn assert_in_order(hits: &[crate::webhooks::Hit], want: &HashMap<String, Vec<String>>) {
    let pos: Vec<&str> = hits.iter().map(|h| h.event_id()).collect();
    for (token, ids) in want {
        for pair in ids.windows(2) {
            let last_earlier = pos.iter().rposition(|id| *id == pair[0]);
            let first_later = pos.iter().position(|id| *id == pair[1]);
            let (Some(le), Some(fl)) = (last_earlier, first_later) else {
                panic!("token {token}: {} or {} never sent", pair[0], pair[1]);
            };
            assert!(
                le < fl,
                "token {token}: {} attempted (hit {fl}) before {} was finished (hit {le})",
                pair[1],
                pair[0]
            );
        }
    }
}

async fn receiver_down_then_up_delivers_in_order_per_token(b: Backend) {
    let app = fast(TestApp::builder(b))
        .env("TOKENGATE__WEBHOOKS__MAX_ATTEMPTS", "1000")
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    let pans = ["4111111111111111", "5555555555554444", "4012888888881881"];
    let mut tokens = Vec::new();
    for pan in pans {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let t: Value = r.json().await.unwrap();
        tokens.push(t["id"].as_str().unwrap().to_owned());
    }
    let rx = Receiver::start().await;
    // Down (every answer 500) while the tokens change.
    rx.state.status.store(500, Ordering::SeqCst);
    let (_, secret) = endpoint(&app, &key, &rx.url(), &["token.suspended", "token.resumed"]).await;
    churn(&app, &key, &tokens).await;
    let expected = tokens.len() * 4;
    // Every token's first event is being retried, the others wait behind it, untried.
    eventually("the first events failing, the others waiting", || async {
        let all = events(&app, &key).await;
        let count = |s: &str| all.iter().filter(|e| e["status"] == s).count();
        (all.len() == expected
            && count("failed") == tokens.len()
            && count("pending") == expected - tokens.len()
            && rx.hits().len() >= 2 * tokens.len())
        .then_some(())
    })
    .await;
    let tried: HashSet<String> = rx.hits().iter().map(|h| h.event_id().to_owned()).collect();
    assert_eq!(tried.len(), tokens.len(), "only the heads were attempted");

    // Up again: everything arrives, in order per token.
    rx.state.status.store(200, Ordering::SeqCst);
    let all = eventually("every event delivered", || async {
        let all = events(&app, &key).await;
        all.iter()
            .all(|e| e["status"] == "delivered")
            .then_some(all)
    })
    .await;
    let want = stored_order(&all, &rx);
    assert_eq!(want.len(), tokens.len());
    let hits = rx.hits();
    assert_in_order(&hits, &want);
    // The types follow the calls: suspended, resumed, suspended, resumed.
    for ids in want.values() {
        let types: Vec<String> = ids
            .iter()
            .map(|id| rx.hits_for(id)[0].header("tokengate-event-type").to_owned())
            .collect();
        assert_eq!(
            types,
            [
                "token.suspended",
                "token.resumed",
                "token.suspended",
                "token.resumed"
            ]
        );
    }
    // Each event delivered once (the failed attempts before it are the only other hits).
    for e in &all {
        let id = e["id"].as_str().unwrap();
        let mine = rx.hits_for(id);
        assert_signed(&secret, mine.last().unwrap());
        assert_eq!(
            e["deliveries"][0]["attempts"].as_u64().unwrap() as usize,
            mine.len()
        );
    }
}

async fn a_dead_letter_releases_the_token(b: Backend) {
    let app = fast(TestApp::builder(b))
        .env("TOKENGATE__WEBHOOKS__MAX_ATTEMPTS", "2")
        .start()
        .await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let rx = Receiver::start().await;
    // The first event's two attempts fail; everything after succeeds.
    rx.state.fail_next.store(2, Ordering::SeqCst);
    let (ep, _) = endpoint(&app, &key, &rx.url(), &["token.suspended", "token.resumed"]).await;
    for verb in ["suspend", "resume", "suspend"] {
        let r = post_empty(&app, &format!("/v1/tokens/{token}/{verb}"), &key).await;
        assert_eq!(r.status(), 200);
    }
    let all = eventually("the first dead, the rest delivered", || async {
        let all = events(&app, &key).await;
        let statuses: Vec<&str> = all
            .iter()
            .rev()
            .map(|e| e["status"].as_str().unwrap())
            .collect();
        (statuses == ["dead", "delivered", "delivered"]).then_some(all)
    })
    .await;
    let want = stored_order(&all, &rx);
    let ids = &want[&token];
    assert_eq!(
        rx.hits_for(&ids[0]).len(),
        2,
        "two failed attempts, then dead"
    );
    assert_in_order(&rx.hits(), &want);
    let first = all.last().unwrap();
    assert_eq!(first["deliveries"][0]["endpointId"], ep.as_str());
    assert_eq!(first["deliveries"][0]["lastError"], "http_500");
}

/// Two gateways share one Redis (standalone or Cluster): a token's events are delivered in
/// order whichever instance's worker takes them, and each event once.
async fn two_instances_deliver_in_order(b: Backend) {
    let a = fast(TestApp::builder(b)).start().await;
    let shared = match b {
        Backend::Redis => (
            "TOKENGATE__STORAGE__REDIS_URL",
            a.redis.as_ref().unwrap().url(),
        ),
        _ => {
            let list: Vec<String> = a
                .cluster
                .as_ref()
                .unwrap()
                .addrs()
                .iter()
                .map(|x| format!("\"{x}\""))
                .collect();
            (
                "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES",
                format!("[{}]", list.join(",")),
            )
        }
    };
    let second = fast(TestApp::builder(Backend::Embedded))
        .env(shared.0, &shared.1)
        .start()
        .await;
    let rx = Receiver::start().await;
    // Slow answers keep deliveries in flight, and the first answers fail: retries become due
    // on a timer, not on a wake-up of the instance that released them, so both instances'
    // workers (polling every 50 ms) take turns on every token's chain.
    rx.state.delay_ms.store(50, Ordering::SeqCst);
    let failures = 16;
    rx.state.fail_next.store(failures, Ordering::SeqCst);
    let (_, key) = a.create_merchant("Acme").await;
    let (_, secret) = endpoint(
        &second,
        &key,
        &rx.url(),
        &["token.suspended", "token.resumed"],
    )
    .await;
    let pans = [
        "4111111111111111",
        "5555555555554444",
        "4012888888881881",
        "4000056655665556",
    ];
    let mut tokens = Vec::new();
    for pan in pans {
        let r = a.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let t: Value = r.json().await.unwrap();
        tokens.push(t["id"].as_str().unwrap().to_owned());
    }
    churn(&a, &key, &tokens).await;
    let expected = tokens.len() * 4;
    let all = eventually("every event delivered", || async {
        let all = events(&a, &key).await;
        (all.len() == expected && all.iter().all(|e| e["status"] == "delivered")).then_some(all)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = rx.hits();
    assert_eq!(
        hits.len(),
        expected + failures,
        "each event delivered exactly once, after the failed attempts"
    );
    for h in &hits {
        assert_signed(&secret, h);
    }
    for e in &all {
        let id = e["id"].as_str().unwrap();
        let attempts = e["deliveries"][0]["attempts"].as_u64().unwrap() as usize;
        assert_eq!(rx.hits_for(id).len(), attempts, "{e}");
    }
    assert_in_order(&hits, &stored_order(&all, &rx));
    // Both instances made attempts on these chains (retries are claimed by whichever instance
    // polls first once they are due; a release wakes only the instance that made it).
    let logs = crate::support::captured_logs();
    let mut consumers = HashSet::new();
    let attempt =
        |l: &&str| l.contains("webhook delivered") || l.contains("webhook attempt failed");
    for line in logs.lines().filter(attempt) {
        if all.iter().any(|e| line.contains(e["id"].as_str().unwrap()))
            && let Some(i) = line.find("consumer=gw-")
        {
            consumers.insert(line[i..].split_whitespace().next().unwrap().to_owned());
        }
    }
    assert_eq!(consumers.len(), 2, "attempts by {consumers:?}");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_deliver_in_order() {
    two_instances_deliver_in_order(Backend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_cluster_deliver_in_order() {
    two_instances_deliver_in_order(Backend::RedisCluster).await
}
