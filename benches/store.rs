//! Store benchmarks: token insert, dedup, get and fingerprint lookup against a real
//! `redis-server` (started here on a free port) and the embedded redb store on a temp dir.
//!
//! Run with `cargo bench --bench store`. Redis figures include one loopback round trip per
//! operation; embedded writes include an fsync per commit (durable on return).
#![expect(
    clippy::expect_used,
    reason = "a bench that cannot start its backend has nothing to measure"
)]

use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use time::macros::datetime;
use tokengate::domain::ports::TokenStore;
use tokengate::domain::token::{
    CardMeta, Fingerprints, MerchantId, SealedPan, TokenId, TokenRecord, TokenStatus, Usage,
};
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::{RedisConfig, RedisStore};
use tokengate_cards::{Brand, Expiry};

/// A throwaway `redis-server` without persistence; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let deadline = Instant::now() + Duration::from_secs(5);
        // A probe that connected to itself (closed loopback port picked as its own source) is
        // not the server: keep waiting.
        while !std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record(m: &MerchantId) -> TokenRecord {
    let t = datetime!(2026-01-02 03:04:05 UTC);
    let fp = uuid::Uuid::new_v4().simple().to_string();
    TokenRecord {
        id: TokenId::generate(),
        merchant_id: m.clone(),
        usage: Usage::CardOnFile,
        status: TokenStatus::Active,
        card: CardMeta {
            brand: Brand::Visa,
            bin: "411111".into(),
            last4: "1111".into(),
            expiry: Expiry::trusted(12, 2030).expect("valid expiry"),
        },
        network_token: None,
        customer_reference: None,
        // Realistic size: 12-byte nonce + 16 digits + 16-byte tag.
        sealed_pan: SealedPan {
            key_id: "k1".into(),
            blob: vec![7u8; 44],
        },
        fingerprints: Fingerprints {
            pan_expiry: format!("{fp}e"),
            pan: fp,
            previous: Vec::new(),
        },
        created_at: t,
        updated_at: t,
        last_event_at: None,
        recurring_agreement: None,
        version: 1,
    }
}

fn bench_store<S: TokenStore + Clone>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: S,
) {
    let m = MerchantId::generate();
    let known = record(&m);
    rt.block_on(store.insert_token(&known))
        .expect("seed insert");

    let mut g = c.benchmark_group(format!("store/{name}"));
    g.throughput(Throughput::Elements(1));

    g.bench_function("insert_token", |b| {
        b.to_async(rt).iter_batched(
            || (store.clone(), record(&m)),
            |(s, r)| async move { black_box(s.insert_token(&r).await.expect("insert")) },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("insert_token_duplicate", |b| {
        b.to_async(rt).iter_batched(
            || {
                let mut r = record(&m);
                r.fingerprints = known.fingerprints.clone();
                (store.clone(), r)
            },
            |(s, r)| async move { black_box(s.insert_token(&r).await.expect("dedup")) },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("get_token", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(store.get_token(&m, &known.id).await.expect("get")) })
    });
    g.bench_function("find_by_fingerprint", |b| {
        b.to_async(rt).iter(|| async {
            black_box(
                store
                    .find_by_fingerprint(&m, &known.fingerprints.pan)
                    .await
                    .expect("find"),
            )
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    // The runtime the gateway ships with: multi-threaded tokio.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let server = RedisServer::start();
    let cfg = RedisConfig {
        url: format!("redis://127.0.0.1:{}/", server.port),
        ..RedisConfig::default()
    };
    let redis = rt
        .block_on(RedisStore::connect(&cfg))
        .expect("connect to redis");
    bench_store(c, &rt, "redis", redis);

    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = EmbeddedStore::open(dir.path()).expect("open embedded store");
    bench_store(c, &rt, "embedded", embedded);
}

criterion_group!(store, benches);
criterion_main!(store);
