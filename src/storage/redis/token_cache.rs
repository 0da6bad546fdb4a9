//! The in-process token cache of the Redis store (standalone Redis only): decoded token records
//! for the reads that answer a client (`TokenStore::read_token`, `GET /v1/tokens/{id}`), kept
//! coherent with Redis by server-assisted client-side caching (RESP3 `CLIENT TRACKING`).
//!
//! # Why it is safe
//!
//! - **Every cached record was read on the tracking connection.** That connection speaks RESP3
//!   and has `CLIENT TRACKING ON` (default mode): Redis remembers each key it reads and, when any
//!   client changes the key (an update script of any instance, a D1 notification handled
//!   anywhere, a delete, `FLUSHALL`), pushes `invalidate <key>` on that same connection. Redis
//!   queues the push before it answers the writer, so by the time the instance that made a change
//!   replies to its client, the invalidation is already on its way to every other instance.
//! - **Order on one connection.** Replies and pushes arrive in one stream. A write that happened
//!   before our read is in the value we read; one after it produces a push that comes after our
//!   reply. The push is applied synchronously by the connection's reader (the push sender is a
//!   closure, not a channel), and every shard keeps a generation number bumped by each
//!   invalidation: a read inserts its record only if its shard saw no invalidation since the read
//!   was sent, under the same lock, so a push processed before the insert can never be undone by
//!   it.
//! - **Connection loss flushes.** Pushes lost with a connection would leave stale entries: when
//!   the tracking connection fails (the reader's disconnection notice, an I/O error or a timeout
//!   on a tracked read) the whole cache is emptied and nothing is cached until a new connection
//!   has tracking on again. Entries therefore exist only while their invalidations can arrive.
//! - **No clear data.** Entries are the stored records: the PAN only sealed (AES-GCM), as in
//!   Redis itself.
//!
//! The remaining window is the time the reader task of an instance takes to read a push that the
//! kernel already delivered to its socket (scheduling, microseconds), documented in
//! `docs/storage.md`. Redis Cluster is not cached: it would need a tracking connection per node
//! and a flush on every slot move.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError, Value};

use crate::domain::token::{TokenId, TokenRecord};

/// Shards of the map, so concurrent GETs rarely wait on one lock.
const SHARDS: usize = 16;

/// Lowest and highest pause between attempts to open the tracking connection.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

struct Shard {
    /// Bumped by every invalidation and flush that touches this shard: a read started under an
    /// older generation does not insert (see the module docs).
    generation: u64,
    entries: HashMap<Box<str>, Cached>,
}

/// What a cached key holds: a token record, or (a fingerprint index key) the id of the token it
/// points at.
#[derive(Clone)]
pub(crate) enum Cached {
    Record(Arc<TokenRecord>),
    Index(TokenId),
}

/// The live tracking connection and the epoch it belongs to.
#[derive(Clone)]
struct Link {
    epoch: u64,
    conn: MultiplexedConnection,
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Entries per shard (the configured bound divided over the shards).
    per_shard: usize,
    /// `None` while there is no connection with tracking on: nothing is cached then.
    link: RwLock<Option<Link>>,
    /// Incremented for every connection attempt, so a late notice of an old connection is
    /// recognised and ignored.
    epoch: AtomicU64,
    /// Wakes the task that (re)opens the tracking connection.
    reconnect: Arc<tokio::sync::Notify>,
    /// The read barrier (see [`TokenCache::sync`]): barriers asked for so far...
    requested: AtomicU64,
    /// ...the highest one a `PING` answered (every barrier up to it is passed)...
    passed: tokio::sync::watch::Sender<u64>,
    /// ...and the wake-up of the task that sends those `PING`s.
    ping: Arc<tokio::sync::Notify>,
    /// Set when the cache is dropped, so the `PING` task ends.
    closed: std::sync::atomic::AtomicBool,
    stats: Stats,
}

/// Counters for tests and the docs' figures.
#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

/// What a lookup found: the record, or the ticket a read must present to insert its result.
pub(crate) enum Lookup {
    Hit(Cached),
    /// Not cached. Read on `conn` (the tracking connection) and hand the result to
    /// [`TokenCache::insert`] with this ticket.
    Miss(Ticket),
    /// No tracking connection right now: read without the cache.
    Off,
}

pub(crate) struct Ticket {
    shard: usize,
    generation: u64,
    epoch: u64,
    conn: MultiplexedConnection,
}

/// Counters of one cache (see [`TokenCache::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Keys invalidated by a Redis push.
    pub invalidations: u64,
    /// Whole-cache flushes (connection lost, `FLUSHALL`).
    pub flushes: u64,
    pub entries: usize,
    /// Whether a tracking connection is up.
    pub tracking: bool,
}

/// The cache; cheap to share behind the store's `Arc`.
pub(crate) struct TokenCache {
    shared: Arc<Shared>,
}

impl TokenCache {
    /// Starts the cache with room for about `entries` records and a background task that keeps
    /// a tracking connection to `client`'s server open. Returns at once; reads go uncached until
    /// the first connection has tracking on.
    pub(crate) fn start(
        client: &redis::Client,
        entries: usize,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> TokenCache {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    generation: 0,
                    entries: HashMap::new(),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            hasher: RandomState::new(),
            per_shard: entries.div_ceil(SHARDS).max(1),
            link: RwLock::new(None),
            epoch: AtomicU64::new(0),
            reconnect: Arc::new(tokio::sync::Notify::new()),
            requested: AtomicU64::new(0),
            passed: tokio::sync::watch::Sender::new(0),
            ping: Arc::new(tokio::sync::Notify::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            stats: Stats::default(),
        });
        tokio::spawn(send_pings(Arc::downgrade(&shared), shared.ping.clone()));
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        tokio::spawn(keep_connected(
            Arc::downgrade(&shared),
            info,
            connect_timeout,
            response_timeout,
        ));
        TokenCache { shared }
    }

    /// Waits (up to `within`) until a tracking connection is up; for start-up and tests.
    pub(crate) async fn wait_tracking(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.shared.current().is_some() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The read barrier, passed before every cache lookup: returns once a `PING` sent on the
    /// tracking connection after this call was answered. Redis queues an invalidation before it
    /// answers the write that caused it, and processes our `PING` after that write (the client
    /// saw the write's answer before sending us this request), so the `PONG` comes after the
    /// push on the connection, and the reader applied the push before it handed us the `PONG`.
    /// Without this, a push already delivered to the socket but not yet read could let a stale
    /// entry answer (seen in tests). Concurrent readers share one `PING`, so under load a batch
    /// of GETs costs one small round trip instead of one `HGET` and one JSON decode each.
    /// `false`: no tracking connection, or it failed: read without the cache.
    pub(crate) async fn sync(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        if !s.linked() {
            return false;
        }
        let mut passed = s.passed.subscribe();
        let want = s.requested.fetch_add(1, Ordering::SeqCst) + 1;
        s.ping.notify_one();
        let ok = matches!(
            tokio::time::timeout(timeout, passed.wait_for(|p| *p >= want)).await,
            Ok(Ok(_))
        );
        ok && s.linked()
    }

    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        let shard = self.shared.shard_of(key);
        let (generation, hit) = {
            let s = self.shared.lock(shard);
            (s.generation, s.entries.get(key).cloned())
        };
        if let Some(rec) = hit {
            self.shared.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(rec);
        }
        // Generation first, then the link: a flush between the two bumps the generation, so
        // the ticket is refused at insert time.
        let Some(link) = self.shared.current() else {
            return Lookup::Off;
        };
        self.shared.stats.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(Ticket {
            shard,
            generation,
            epoch: link.epoch,
            conn: link.conn,
        })
    }

    /// Runs `cmd` (a read of one key) on the ticket's tracking connection, so Redis tracks the
    /// key for this instance. `Ok(None)`: the connection failed in a way that may have lost
    /// pushes; the cache was emptied and the caller reads without it.
    pub(crate) async fn read(
        &self,
        ticket: &Ticket,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<Option<Value>, RedisError> {
        let mut conn = ticket.conn.clone();
        match tokio::time::timeout(timeout, conn.req_packed_command(cmd)).await {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(e)) if !breaks_tracking(&e) => Err(e),
            Ok(Err(_)) | Err(_) => {
                self.shared.link_down(ticket.epoch);
                Ok(None)
            }
        }
    }

    /// Keeps `value`, read on the ticket's connection, unless its key was invalidated (or the
    /// cache flushed) since the ticket was issued.
    pub(crate) fn insert(&self, ticket: Ticket, key: &str, value: Cached) {
        let live = self
            .shared
            .current()
            .is_some_and(|l| l.epoch == ticket.epoch);
        if !live {
            return;
        }
        let mut s = self.shared.lock(ticket.shard);
        if s.generation != ticket.generation {
            return;
        }
        if s.entries.len() >= self.shared.per_shard && !s.entries.contains_key(key) {
            // Bounded: drop one entry (the map's iteration order is arbitrary, so in effect a
            // random one). Redis keeps tracking it, which costs a push later, nothing more.
            if let Some(victim) = s.entries.keys().next().cloned() {
                s.entries.remove(&victim);
            }
        }
        s.entries.insert(key.into(), value);
    }

    pub(crate) fn stats(&self) -> TokenCacheStats {
        let st = &self.shared.stats;
        let entries = (0..SHARDS).map(|i| self.shared.lock(i).entries.len()).sum();
        TokenCacheStats {
            hits: st.hits.load(Ordering::Relaxed),
            misses: st.misses.load(Ordering::Relaxed),
            invalidations: st.invalidations.load(Ordering::Relaxed),
            flushes: st.flushes.load(Ordering::Relaxed),
            entries,
            tracking: self.shared.current().is_some(),
        }
    }
}

impl Drop for TokenCache {
    /// Ends the `PING` task (it holds only a weak reference and waits without a timer). The
    /// flag covers a task woken before the last strong reference is gone.
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.ping.notify_one();
    }
}

/// Whether a failed tracked read may have cost us pushes (the connection is suspect).
fn breaks_tracking(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

impl Shared {
    fn shard_of(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave a half-written entry (each critical
        // section is one map operation), so a poisoned lock is still usable.
        self.shards[shard]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a tracking connection is up; unlike [`Shared::current`] it copies nothing (the
    /// read barrier asks twice per read: a `Link` clone is several shared reference counts).
    fn linked(&self) -> bool {
        self.link
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    fn current(&self) -> Option<Link> {
        self.link
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn invalidate(&self, key: &[u8]) {
        // Keys we cache are UTF-8 (built by the store); others cannot be in the map.
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        let mut s = self.lock(self.shard_of(key));
        s.generation += 1;
        s.entries.remove(key);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self) {
        for i in 0..SHARDS {
            let mut s = self.lock(i);
            s.generation += 1;
            s.entries.clear();
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection of `epoch` is gone or suspect: stop caching, empty the cache, reconnect.
    /// The link is cleared before the flush, so no read can insert under it afterwards.
    fn link_down(&self, epoch: u64) {
        {
            let mut link = self
                .link
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*link {
                Some(l) if l.epoch == epoch => *link = None,
                // Another connection already replaced it, or it was never up.
                _ => return,
            }
        }
        self.flush();
        tracing::warn!("redis token cache: tracking connection lost; cache emptied, reconnecting");
        self.reconnect.notify_one();
    }

    /// A push from the connection of `epoch`, applied in the connection's reader.
    fn on_push(&self, epoch: u64, push: PushInfo) {
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(Value::Array(keys)) => {
                    for k in keys {
                        if let Value::BulkString(b) = k {
                            self.invalidate(b);
                        } else if let Value::SimpleString(s) = k {
                            self.invalidate(s.as_bytes());
                        }
                    }
                }
                // Null instead of keys: FLUSHALL / FLUSHDB (or a tracking table reset).
                _ => self.flush(),
            },
            PushKind::Disconnection => self.link_down(epoch),
            _ => {}
        }
    }
}

/// Sends the barrier `PING`s: one per batch of waiting readers, on the tracking connection. A
/// failed `PING` takes the link down (which empties the cache), so the readers it releases find
/// nothing cached. The `PING` is bounded by the connection's response timeout (set in
/// [`open_tracking`]); the task ends when the cache is dropped ([`TokenCache`]'s `Drop` wakes
/// it), so a wait costs no timer.
async fn send_pings(shared: Weak<Shared>, wake: Arc<tokio::sync::Notify>) {
    // Built once: the same command every time.
    let ping = redis::cmd("PING");
    loop {
        wake.notified().await;
        let Some(s) = shared.upgrade() else { return };
        if s.closed.load(Ordering::Acquire) {
            return;
        }
        loop {
            // Let the tasks already runnable on this worker go first: under load they are
            // requests that are about to ask for a barrier too, and then one `PING` serves them
            // all instead of each batch being the first reader or two (a `PING` is a write on
            // the connection, a wake-up of its task and of Redis: ~7% of a GET's CPU with
            // batches of 1-3 readers; docs/performance.md, "GET and dedup, round 5"). When
            // nothing else is runnable it costs one scheduler pass.
            tokio::task::yield_now().await;
            // Every barrier asked for before this load is covered by the PING sent after it.
            let upto = s.requested.load(Ordering::SeqCst);
            if upto <= *s.passed.borrow() {
                break;
            }
            if let Some(link) = s.current() {
                let mut conn = link.conn;
                if conn.req_packed_command(&ping).await.is_err() {
                    s.link_down(link.epoch);
                }
            }
            s.passed.send_replace(upto);
        }
    }
}

/// Opens the tracking connection, and opens it again whenever it is lost, until the cache is
/// dropped.
async fn keep_connected(
    shared: Weak<Shared>,
    info: redis::ConnectionInfo,
    connect_timeout: Duration,
    response_timeout: Duration,
) {
    let mut pause = RECONNECT_MIN;
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.current().is_none() {
            match open_tracking(&s, &info, connect_timeout, response_timeout).await {
                Ok(()) => pause = RECONNECT_MIN,
                Err(e) => {
                    tracing::warn!(error = %e.category(), "redis token cache: no tracking connection; reads go uncached");
                    drop(s);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECONNECT_MAX);
                    continue;
                }
            }
        }
        // Wait for a loss notice; hold only a weak reference meanwhile, and look again now and
        // then so a dropped cache ends this task.
        let reconnect = s.reconnect.clone();
        drop(s);
        let _ = tokio::time::timeout(Duration::from_secs(5), reconnect.notified()).await;
    }
}

async fn open_tracking(
    s: &Arc<Shared>,
    info: &redis::ConnectionInfo,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<(), RedisError> {
    let epoch = s.epoch.fetch_add(1, Ordering::Relaxed) + 1;
    let weak = Arc::downgrade(s);
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        // A closure, not a channel: pushes are applied by the reader itself, in stream order
        // with the replies (module docs). It must not block: one shard lock at a time.
        .set_push_sender(move |push: PushInfo| {
            if let Some(s) = weak.upgrade() {
                s.on_push(epoch, push);
            }
            Ok::<(), std::convert::Infallible>(())
        });
    let client = redis::Client::open(info.clone())?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let _: Value = conn
        .req_packed_command(redis::cmd("CLIENT").arg("TRACKING").arg("ON"))
        .await?;
    // Anything cached before (nothing, normally: the cache is flushed when a link goes down)
    // was read on another connection: start empty.
    s.flush();
    *s.link
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Link { epoch, conn });
    tracing::info!("redis token cache: tracking connection up");
    Ok(())
}
