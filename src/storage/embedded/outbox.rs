//! The webhook outbox on the embedded store: redb tables beside the token tables, the same
//! semantics as the Redis outbox (`docs/storage.md`), each operation one write transaction.
//!
//! The queue is one table ordered by due time. Claiming a job moves it to `now + lease`: a job
//! whose worker finishes it is removed (or moved to its retry time, or to the dead-letter
//! table); a job whose worker died simply becomes due again when the lease ends, which is how a
//! gateway killed mid-delivery delivers after a restart. The claim's handle is the lease time, so
//! a worker whose lease ran out (and whose job was claimed again) finds nothing to finish.
//!
//! Order per subject: the jobs of an event with a subject are also written to their
//! (endpoint, subject) chain, numbered in append order, and queued only when they are the
//! chain's first entry; the finish of a chain's head (delivered or dead) removes it and queues
//! the next, in the same transaction as the finish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError, Value, WriteTransaction,
};
use time::OffsetDateTime;

use super::{EmbeddedStore, begin_write};
use crate::domain::ports::StoreError;
use crate::domain::ports::outbox::{DEAD_LETTER_MAX, EventAppend, JobNext, OutboxJob, OutboxStore};
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{
    DeliveryState, EndpointId, EventId, EventRecord, WebhookEndpoint, WebhookEvent, unix_ms,
};
use crate::storage::codec::outbox::{chain_entry, decode_job, encode_job, next_attempt};

/// (merchant id, endpoint id) -> endpoint JSON.
const ENDPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("wh_endpoints");
/// (merchant id, event id) -> event JSON.
const EVENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("wh_events");
/// (merchant id, event id, endpoint id) -> delivery state JSON.
const DELIVERIES: TableDefinition<(&str, &str, &str), &[u8]> =
    TableDefinition::new("wh_deliveries");
/// (created at ms, merchant id, event id) -> (): finds events past retention without a scan.
const EVENT_TIMES: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("wh_event_times");
/// (due at ms, job) -> (): the job queue; claimed jobs sit at their lease end.
const QUEUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("wh_queue");
/// (merchant id, endpoint id, subject, sequence) -> job (0 attempts): the in-order chains;
/// the first entry of a chain is its head, the only one in [`QUEUE`].
const CHAINS: TableDefinition<(&str, &str, &str, u64), &str> = TableDefinition::new("wh_chains");
/// (dead at ms, job) -> reason code: the dead-letter list, capped at [`DEAD_LETTER_MAX`].
const DEAD: TableDefinition<(u64, &str), &str> = TableDefinition::new("wh_dead");

/// Upper bound for the second part of a key range over ids: every id character
/// (`[A-Za-z0-9_-]`) sorts below `~`.
const ID_MAX: &str = "~";
/// Events past retention removed per enqueue, so cleanup cost per write stays bounded.
const PURGE_BATCH: usize = 32;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// serde_json messages can quote values; keep only the kind and position.
fn corrupt(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} is not valid JSON ({:?} error at line {}, column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| corrupt(what, &e))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| corrupt(what, &e))
}

/// Opens a table for reading; `None` when no write created it yet (the outbox tables are made
/// on first use, not by `EmbeddedStore::open`).
fn read_table<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The deliveries of one event, in endpoint id order.
fn deliveries_of(
    table: &impl ReadableTable<(&'static str, &'static str, &'static str), &'static [u8]>,
    m: &str,
    e: &str,
) -> Result<Vec<DeliveryState>, StoreError> {
    let mut out = Vec::new();
    for entry in table.range((m, e, "")..(m, e, ID_MAX))? {
        let (_, v) = entry?;
        out.push(decode("webhook delivery state", v.value())?);
    }
    Ok(out)
}

/// Reads one event with its deliveries inside a read transaction.
fn event_in(txn: &ReadTransaction, m: &str, e: &str) -> Result<Option<EventRecord>, StoreError> {
    let Some(events) = read_table(txn, EVENTS)? else {
        return Ok(None);
    };
    let Some(event) = events
        .get((m, e))?
        .map(|g| decode::<WebhookEvent>("webhook event", g.value()))
        .transpose()?
    else {
        return Ok(None);
    };
    let deliveries = match read_table(txn, DELIVERIES)? {
        Some(t) => deliveries_of(&t, m, e)?,
        None => Vec::new(),
    };
    Ok(Some(EventRecord { event, deliveries }))
}

/// Writes pending deliveries and jobs (0 attempts) for `endpoints`: due now, or, with a
/// `subject`, appended to each endpoint's chain and due now only when first in it.
fn queue_pending(
    txn: &WriteTransaction,
    merchant: &MerchantId,
    event: &EventId,
    endpoints: &[EndpointId],
    now: u64,
    subject: Option<&str>,
) -> Result<(), StoreError> {
    let mut deliveries = txn.open_table(DELIVERIES)?;
    let mut queue = txn.open_table(QUEUE)?;
    let mut chains = txn.open_table(CHAINS)?;
    let m = merchant.as_str();
    for ep in endpoints {
        let state = encode(
            "webhook delivery state",
            &DeliveryState::pending(ep.clone()),
        )?;
        deliveries.insert((m, event.as_str(), ep.as_str()), state.as_slice())?;
        let job = encode_job(merchant, event, ep, 0, subject);
        if let Some(s) = subject {
            let w = ep.as_str();
            let last = chains
                .range((m, w, s, 0)..=(m, w, s, u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().3);
            chains.insert(
                (m, w, s, last.map_or(0, |n| n.saturating_add(1))),
                job.as_str(),
            )?;
            if last.is_some() {
                // Waits for the earlier events of its subject.
                continue;
            }
        }
        queue.insert((now, job.as_str()), ())?;
    }
    Ok(())
}

/// After `job` finished (delivered or dead): if its event heads its chain, removes it and
/// queues the next entry, due now. Nothing otherwise (no chain, or already released).
fn advance_chain(txn: &WriteTransaction, job: &OutboxJob, now: u64) -> Result<(), StoreError> {
    let (Some(s), Some(entry)) = (job.subject.as_deref(), chain_entry(job)) else {
        return Ok(());
    };
    let (m, w) = (job.merchant.as_str(), job.endpoint.as_str());
    let mut chains = txn.open_table(CHAINS)?;
    let mut first = Vec::with_capacity(2);
    for item in chains.range((m, w, s, 0)..=(m, w, s, u64::MAX))?.take(2) {
        let (k, v) = item?;
        first.push((k.value().3, v.value().to_owned()));
    }
    let Some((seq, head)) = first.first() else {
        return Ok(());
    };
    if *head != entry {
        return Ok(());
    }
    chains.remove((m, w, s, *seq))?;
    if let Some((_, next)) = first.get(1) {
        txn.open_table(QUEUE)?.insert((now, next.as_str()), ())?;
    }
    Ok(())
}

/// Whether merchant `m` has a webhook endpoint, read inside the write transaction `txn` of a
/// token write that stores no event only while it has none (`update_token_if_no_endpoints`).
pub(crate) fn has_endpoints_in(txn: &WriteTransaction, m: &str) -> Result<bool, StoreError> {
    let t = txn.open_table(ENDPOINTS)?;
    let mut range = t.range((m, "")..(m, ID_MAX))?;
    Ok(range.next().transpose()?.is_some())
}

/// Writes an event, its pending deliveries and their due-now jobs inside `txn`, and trims
/// events past retention: the body of [`OutboxStore::enqueue_event`], shared with the token
/// writes that append their event in the same transaction (`update_token_with`,
/// `apply_event_with`).
pub(crate) fn append_event_in(
    txn: &WriteTransaction,
    append: &EventAppend,
) -> Result<(), StoreError> {
    let event = &append.event;
    let json = encode("webhook event", event)?;
    let created = unix_ms(event.created_at);
    let cutoff = unix_ms(OffsetDateTime::now_utc()).saturating_sub(ms(append.retention));
    let m = event.merchant_id.as_str();
    let e = event.id.as_str();
    txn.open_table(EVENTS)?.insert((m, e), json.as_slice())?;
    txn.open_table(EVENT_TIMES)?.insert((created, m, e), ())?;
    queue_pending(
        txn,
        &event.merchant_id,
        &event.id,
        &append.endpoints,
        now_ms(),
        event.subject().as_deref(),
    )?;
    purge_events(txn, cutoff)
}

/// Removes up to [`PURGE_BATCH`] events created before `cutoff_ms`, with their deliveries.
fn purge_events(txn: &WriteTransaction, cutoff_ms: u64) -> Result<(), StoreError> {
    let mut times = txn.open_table(EVENT_TIMES)?;
    let mut due: Vec<(u64, String, String)> = Vec::new();
    for entry in times.range(..(cutoff_ms, "", ""))?.take(PURGE_BATCH) {
        let (k, _) = entry?;
        let (at, m, e) = k.value();
        due.push((at, m.to_owned(), e.to_owned()));
    }
    if due.is_empty() {
        return Ok(());
    }
    let mut events = txn.open_table(EVENTS)?;
    let mut deliveries = txn.open_table(DELIVERIES)?;
    for (at, m, e) in due {
        times.remove((at, m.as_str(), e.as_str()))?;
        events.remove((m.as_str(), e.as_str()))?;
        let mut keys = Vec::new();
        for entry in
            deliveries.range((m.as_str(), e.as_str(), "")..(m.as_str(), e.as_str(), ID_MAX))?
        {
            let (k, _) = entry?;
            keys.push(k.value().2.to_owned());
        }
        for ep in keys {
            deliveries.remove((m.as_str(), e.as_str(), ep.as_str()))?;
        }
    }
    Ok(())
}

#[async_trait]
impl OutboxStore for EmbeddedStore {
    async fn insert_endpoint(&self, ep: &WebhookEndpoint, max: usize) -> Result<bool, StoreError> {
        let json = encode("webhook endpoint", ep)?;
        let m = ep.merchant_id.as_str().to_owned();
        let id = ep.id.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut t = txn.open_table(ENDPOINTS)?;
                let count = t.range((m.as_str(), "")..(m.as_str(), ID_MAX))?.count();
                if count >= max && t.get((m.as_str(), id.as_str()))?.is_none() {
                    return Ok(false);
                }
                t.insert((m.as_str(), id.as_str()), json.as_slice())?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn replace_endpoint(
        &self,
        expected: &WebhookEndpoint,
        new: &WebhookEndpoint,
    ) -> Result<bool, StoreError> {
        if expected.merchant_id != new.merchant_id || expected.id != new.id {
            return Ok(false);
        }
        let json = encode("webhook endpoint", new)?;
        let expected = expected.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut t = txn.open_table(ENDPOINTS)?;
                let key = (expected.merchant_id.as_str(), expected.id.as_str());
                let current = t
                    .get(key)?
                    .map(|g| decode::<WebhookEndpoint>("webhook endpoint", g.value()))
                    .transpose()?;
                // Compared decoded, not as bytes: a record written before a field existed
                // encodes differently but is the same endpoint.
                if current.as_ref() != Some(&expected) {
                    return Ok(false);
                }
                t.insert(key, json.as_slice())?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn list_endpoints(
        &self,
        merchant: &MerchantId,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let m = merchant.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(t) = read_table(&txn, ENDPOINTS)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in t.range((m.as_str(), "")..(m.as_str(), ID_MAX))? {
                let (_, v) = entry?;
                out.push(decode("webhook endpoint", v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let m = merchant.as_str().to_owned();
        let id = id.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(t) = read_table(&txn, ENDPOINTS)? else {
                return Ok(None);
            };
            let found = t.get((m.as_str(), id.as_str()))?;
            found
                .map(|g| decode("webhook endpoint", g.value()))
                .transpose()
        })
        .await
    }

    async fn delete_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<bool, StoreError> {
        let m = merchant.as_str().to_owned();
        let id = id.as_str().to_owned();
        self.run(move |db| {
            let txn = begin_write(db)?;
            let removed = txn
                .open_table(ENDPOINTS)?
                .remove((m.as_str(), id.as_str()))?
                .is_some();
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn enqueue_event(
        &self,
        event: &WebhookEvent,
        endpoints: &[EndpointId],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let append = EventAppend {
            event: event.clone(),
            endpoints: endpoints.to_vec(),
            retention,
        };
        self.run(move |db| {
            let txn = begin_write(db)?;
            append_event_in(&txn, &append)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_event(
        &self,
        merchant: &MerchantId,
        id: &EventId,
    ) -> Result<Option<EventRecord>, StoreError> {
        let m = merchant.as_str().to_owned();
        let e = id.as_str().to_owned();
        self.run(move |db| event_in(&db.begin_read()?, &m, &e))
            .await
    }

    async fn list_events(
        &self,
        merchant: &MerchantId,
        before: Option<&EventId>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let m = merchant.as_str().to_owned();
        let upper = before.map_or_else(|| ID_MAX.to_owned(), |b| b.as_str().to_owned());
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(events) = read_table(&txn, EVENTS)? else {
                return Ok(Vec::new());
            };
            let deliveries = read_table(&txn, DELIVERIES)?;
            let mut out = Vec::new();
            for entry in events
                .range((m.as_str(), "")..(m.as_str(), upper.as_str()))?
                .rev()
                .take(limit)
            {
                let (k, v) = entry?;
                let event: WebhookEvent = decode("webhook event", v.value())?;
                let ds = match &deliveries {
                    Some(t) => deliveries_of(t, &m, k.value().1)?,
                    None => Vec::new(),
                };
                out.push(EventRecord {
                    event,
                    deliveries: ds,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn put_delivery(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        state: &DeliveryState,
    ) -> Result<(), StoreError> {
        let json = encode("webhook delivery state", state)?;
        let m = merchant.as_str().to_owned();
        let e = event.as_str().to_owned();
        let ep = state.endpoint_id.as_str().to_owned();
        self.run(move |db| {
            let txn = begin_write(db)?;
            // Only while the event exists: a late write must not outlive a purged event.
            let exists = txn
                .open_table(EVENTS)?
                .get((m.as_str(), e.as_str()))?
                .is_some();
            if exists {
                txn.open_table(DELIVERIES)?
                    .insert((m.as_str(), e.as_str(), ep.as_str()), json.as_slice())?;
                txn.commit()?;
            }
            Ok(())
        })
        .await
    }

    async fn redeliver(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        endpoints: &[EndpointId],
    ) -> Result<(), StoreError> {
        let merchant = merchant.clone();
        let event = event.clone();
        let endpoints = endpoints.to_vec();
        self.run(move |db| {
            let txn = begin_write(db)?;
            let exists = txn
                .open_table(EVENTS)?
                .get((merchant.as_str(), event.as_str()))?
                .is_some();
            if exists {
                // A redelivery is sent out of band: no chain.
                queue_pending(&txn, &merchant, &event, &endpoints, now_ms(), None)?;
                txn.commit()?;
            }
            Ok(())
        })
        .await
    }

    async fn claim_jobs(
        &self,
        _consumer: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxJob>, StoreError> {
        let lease = ms(lease).max(1);
        self.run(move |db| {
            let now = now_ms();
            let upper = (now.saturating_add(1), "");
            // Most polls find nothing due: a read transaction answers that without a commit.
            {
                let txn = db.begin_read()?;
                let Some(q) = read_table(&txn, QUEUE)? else {
                    return Ok(Vec::new());
                };
                if q.range(..upper)?.next().is_none() {
                    return Ok(Vec::new());
                }
            }
            let txn = begin_write(db)?;
            let mut jobs = Vec::new();
            {
                let mut q = txn.open_table(QUEUE)?;
                let mut due: Vec<(u64, String)> = Vec::new();
                for entry in q.range(..upper)?.take(max.max(1)) {
                    let (k, _) = entry?;
                    let (at, job) = k.value();
                    due.push((at, job.to_owned()));
                }
                let until = now.saturating_add(lease);
                for (at, job) in due {
                    q.remove((at, job.as_str()))?;
                    match decode_job(&job, until.to_string()) {
                        Some(j) => {
                            q.insert((until, job.as_str()), ())?;
                            jobs.push(j);
                        }
                        // Not ours to interpret: dropped rather than claimed forever.
                        None => tracing::warn!("webhook outbox: dropping an unreadable job"),
                    }
                }
            }
            txn.commit()?;
            Ok(jobs)
        })
        .await
    }

    async fn finish_job(&self, job: &OutboxJob, next: JobNext) -> Result<bool, StoreError> {
        let Ok(lease) = job.handle.parse::<u64>() else {
            return Ok(false);
        };
        let current = encode_job(
            &job.merchant,
            &job.event,
            &job.endpoint,
            job.attempts,
            job.subject.as_deref(),
        );
        let following = next_attempt(job);
        let job = job.clone();
        self.run(move |db| {
            let txn = begin_write(db)?;
            {
                let mut q = txn.open_table(QUEUE)?;
                if q.remove((lease, current.as_str()))?.is_none() {
                    // The lease ran out and the job was claimed again: the new holder decides.
                    return Ok(false);
                }
                match &next {
                    JobNext::Done => {}
                    JobNext::Retry { at_ms } => {
                        q.insert((*at_ms, following.as_str()), ())?;
                    }
                    JobNext::Dead { reason } => {
                        let mut dead = txn.open_table(DEAD)?;
                        dead.insert((now_ms(), following.as_str()), reason.as_str())?;
                        if dead.len()? > DEAD_LETTER_MAX as u64 {
                            dead.pop_first()?;
                        }
                    }
                }
            }
            if !matches!(next, JobNext::Retry { .. }) {
                advance_chain(&txn, &job, now_ms())?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }
}
