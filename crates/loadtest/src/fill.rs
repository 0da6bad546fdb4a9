//! `bench-fill`: writes token records for one merchant straight into Redis, so the vault-size
//! step can reach a million tokens in seconds rather than hours through the API and D1.
//!
//! Each record is what a tokenization through D1 leaves behind: a random Luhn-valid PAN sealed
//! with the (sandbox) vault keys, its keyed fingerprints, `ACTIVE` with network-token metadata,
//! written with the gateway's own [`TokenStore::insert_token`] (same script, same keys, same
//! indexes). Many inserts are in flight at once on the store's multiplexed connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use time::OffsetDateTime;
use tokengate::crypto::{Keyring, dev};
use tokengate::domain::ports::{InsertOutcome, TokenStore};
use tokengate::domain::token::{
    CardMeta, MerchantId, NetworkTokenMeta, TokenId, TokenRecord, TokenStatus, Usage,
};
use tokengate::storage::redis::{RedisConfig, RedisStore};
use tokengate_cards::{Expiry, Pan};

use super::BoxError;
use super::loadgen::{EXPIRY_MONTH, EXPIRY_YEAR, random_pan};

#[derive(clap::Args)]
pub struct Args {
    /// Standalone Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Redis Cluster seed nodes (comma-separated host:port); selects Cluster mode.
    #[arg(long, value_delimiter = ',')]
    cluster_nodes: Vec<String>,
    /// Key prefix the gateway uses (storage.key_prefix).
    #[arg(long, default_value = "tg")]
    key_prefix: String,
    /// The merchant the tokens belong to (create it through the API first).
    #[arg(long)]
    merchant_id: String,
    /// Tokens to write.
    #[arg(long)]
    count: u64,
    /// Write every n-th token id to `--sample-out` (for `loadgen --ids-file`).
    #[arg(long, default_value_t = 100)]
    sample_every: u64,
    #[arg(long)]
    sample_out: Option<PathBuf>,
    /// Inserts in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

/// What a fill wrote.
pub struct Filled {
    pub inserted: u64,
    pub duplicates: u64,
    pub elapsed: Duration,
    /// Every `sample_every`-th token id.
    pub sample: Vec<String>,
}

#[expect(
    clippy::field_reassign_with_default,
    reason = "a field added to RedisConfig later keeps its default here"
)]
pub fn redis_config(url: &str, cluster_nodes: &[String], key_prefix: &str) -> RedisConfig {
    let mut cfg = RedisConfig::default();
    cfg.url = url.to_owned();
    cfg.cluster_nodes = cluster_nodes.to_vec();
    cfg.key_prefix = key_prefix.to_owned();
    cfg.connect_timeout = Duration::from_secs(5);
    // Generous: thousands of scripts queue on one connection during a fill.
    cfg.response_timeout = Duration::from_secs(30);
    cfg
}

fn record(
    keyring: &Keyring,
    merchant: &MerchantId,
    now: OffsetDateTime,
) -> Result<TokenRecord, BoxError> {
    let pan: Pan = random_pan().parse()?;
    let expiry = Expiry::trusted(EXPIRY_MONTH, EXPIRY_YEAR).ok_or("bad fill expiry")?;
    let id = TokenId::generate();
    let token_expiry = Expiry::trusted(EXPIRY_MONTH, EXPIRY_YEAR + 3).ok_or("bad fill expiry")?;
    Ok(TokenRecord {
        sealed_pan: keyring.seal(&pan, merchant, &id),
        fingerprints: keyring.fingerprints(merchant, &pan, &expiry),
        merchant_id: merchant.clone(),
        usage: Usage::CardOnFile,
        status: TokenStatus::Active,
        card: CardMeta {
            brand: pan.brand(),
            bin: pan.bin().to_owned(),
            last4: pan.last4().to_owned(),
            expiry,
        },
        network_token: Some(NetworkTokenMeta {
            d1_token_id: format!("d1t_fill_{}", &id.as_str()[4..]),
            last4: Some(pan.last4().to_owned()),
            expiry: Some(token_expiry),
            par: Some(format!("V001FILL{:021}", rand::random::<u64>())),
        }),
        id,
        customer_reference: None,
        created_at: now,
        updated_at: now,
        last_event_at: None,
        recurring_agreement: None,
        // As after create + save of the D1 answer.
        version: 2,
    })
}

/// Writes `count` tokens for `merchant`.
pub async fn fill(
    cfg: &RedisConfig,
    merchant: &MerchantId,
    count: u64,
    sample_every: u64,
    concurrency: usize,
) -> Result<Filled, BoxError> {
    let store = RedisStore::connect(cfg).await?;
    let keyring = Arc::new(Keyring::new(&dev::material())?);
    let now = OffsetDateTime::now_utc();
    let started = Instant::now();
    let every = sample_every.max(1);
    let mut results = futures::stream::iter(0..count)
        .map(|i| {
            let store = store.clone();
            let keyring = Arc::clone(&keyring);
            let merchant = merchant.clone();
            async move {
                let rec = record(&keyring, &merchant, now)?;
                let sampled = (i % every == 0).then(|| rec.id.as_str().to_owned());
                let outcome = store.insert_token(&rec).await?;
                Ok::<_, BoxError>((sampled, matches!(outcome, InsertOutcome::Inserted)))
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut filled = Filled {
        inserted: 0,
        duplicates: 0,
        elapsed: Duration::ZERO,
        sample: Vec::new(),
    };
    while let Some(r) = results.next().await {
        let (sampled, inserted) = r?;
        if inserted {
            filled.inserted += 1;
            filled.sample.extend(sampled);
        } else {
            filled.duplicates += 1;
        }
    }
    filled.elapsed = started.elapsed();
    Ok(filled)
}

pub async fn run(args: Args) -> Result<(), BoxError> {
    let merchant = MerchantId::parse(&args.merchant_id).ok_or("malformed --merchant-id")?;
    let cfg = redis_config(&args.redis_url, &args.cluster_nodes, &args.key_prefix);
    let f = fill(
        &cfg,
        &merchant,
        args.count,
        args.sample_every,
        args.concurrency,
    )
    .await?;
    println!(
        "inserted {} tokens ({} random-PAN collisions skipped) in {:.1} s ({:.0}/s)",
        f.inserted,
        f.duplicates,
        f.elapsed.as_secs_f64(),
        f.inserted as f64 / f.elapsed.as_secs_f64().max(1e-9)
    );
    if let Some(p) = args.sample_out {
        std::fs::write(&p, f.sample.join("\n") + "\n")?;
        println!("{} sampled ids written to {}", f.sample.len(), p.display());
    }
    Ok(())
}
