//! Durable acknowledgement on replicated Redis (`storage.redis_durability`, `docs/storage.md`
//! "Durable acknowledgement").
//!
//! Redis answers a write once the primary applied it and replicates afterwards, so a failover
//! to a replica can lose a write the API already acknowledged. With `wait` (or `waitaof`) every
//! write the API acknowledges is followed by `WAIT <replicas> <timeout>` (or `WAITAOF <local>
//! <replicas> <timeout>`), and the write only counts as done when enough replicas (or AOF
//! fsyncs) confirmed it.
//!
//! Why a pipeline of exactly two commands, `[write, WAIT]`, on one connection:
//! - `WAIT` counts the writes of the client connection it is sent on. Sent alone after the
//!   write, a reconnect in between (the `ConnectionManager` reconnects transparently) would put
//!   it on a fresh connection that wrote nothing, and it would confirm at once. A pipeline goes
//!   out on one connection or fails as a whole.
//! - On Cluster, redis-rs routes a pipeline by its first keyed command; `WAIT` has no key (alone
//!   it would go to every primary), so the pair goes to the node that takes the write.
//! - The connection is multiplexed: other writes may interleave, and `WAIT` then also covers
//!   them (it waits for this connection's latest write). Covering more is harmless.
//!
//! `WAIT` blocks its connection on the server until it returns, so confirmed writes use
//! connections of their own (`Inner::writers`): reads never queue behind a `WAIT`.

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::Conn;

/// Error code of a write that was applied but not confirmed (see [`super::map_err`]).
pub(super) const NOT_DURABLE: &str = "NOTDURABLE";

/// How many connections carry confirmed writes: each is blocked while its `WAIT` runs, so
/// several let concurrent writes wait side by side.
pub(super) const WRITE_CONNECTIONS: usize = 4;

/// What a write must reach before the store reports it done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Applied on the primary (Redis' own acknowledgement): today's behaviour.
    #[default]
    None,
    /// `WAIT`: received by at least `replicas` replicas within `timeout`.
    Wait { replicas: u32, timeout: Duration },
    /// `WAITAOF` (Redis >= 7.2): fsynced to the AOF of the primary (`local` = 1) and of at least
    /// `replicas` replicas within `timeout`.
    WaitAof {
        local: u32,
        replicas: u32,
        timeout: Duration,
    },
}

impl Durability {
    /// The mode as configured and as the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Durability::None => "none",
            Durability::Wait { .. } => "wait",
            Durability::WaitAof { .. } => "waitaof",
        }
    }

    /// How long a confirmation may take (zero without one).
    pub fn timeout(&self) -> Duration {
        match self {
            Durability::None => Duration::ZERO,
            Durability::Wait { timeout, .. } | Durability::WaitAof { timeout, .. } => *timeout,
        }
    }

    /// The confirming command, or `None` when writes are not confirmed.
    pub(super) fn command(&self) -> Option<Cmd> {
        // Never 0: to Redis a timeout of 0 means "block forever".
        let ms = u64::try_from(self.timeout().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        match *self {
            Durability::None => None,
            Durability::Wait { replicas, .. } => {
                let mut c = redis::cmd("WAIT");
                c.arg(replicas).arg(ms);
                Some(c)
            }
            Durability::WaitAof {
                local, replicas, ..
            } => {
                let mut c = redis::cmd("WAITAOF");
                c.arg(local).arg(replicas).arg(ms);
                Some(c)
            }
        }
    }

    /// Reads the confirming command's reply: `Ok(())` when it reached what was asked, else a
    /// short description (counts only) of what it did reach.
    fn check(&self, reply: &Value) -> Result<(), Short> {
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        match (*self, reply) {
            (Durability::None, _) => Ok(()),
            (Durability::Wait { replicas, .. }, Value::Int(n)) => {
                if *n >= i64::from(replicas) {
                    Ok(())
                } else {
                    Err(Short::Acks(format!(
                        "{n} of {replicas} replicas acknowledged"
                    )))
                }
            }
            (
                Durability::WaitAof {
                    local, replicas, ..
                },
                Value::Array(v),
            ) => match (int(v.first()), int(v.get(1))) {
                (Some(l), Some(r)) if l >= i64::from(local) && r >= i64::from(replicas) => Ok(()),
                (Some(l), Some(r)) => Err(Short::Acks(format!(
                    "fsynced locally {l} of {local}, on {r} of {replicas} replicas"
                ))),
                _ => Err(Short::Refused),
            },
            // An error reply (`WAITAOF` before Redis 7.2 or without `appendonly yes`, `WAIT`
            // refused) or an unexpected shape.
            _ => Err(Short::Refused),
        }
    }
}

/// Why a write was not confirmed.
enum Short {
    /// The server answered with fewer acknowledgements than asked.
    Acks(String),
    /// The server refused the confirming command (or answered something else).
    Refused,
}

/// A connection whose every write is confirmed per [`Durability`]; with `None`, a plain
/// pass-through.
pub(super) struct Acked {
    conn: Conn,
    durability: Durability,
    wait: Option<Cmd>,
}

impl Acked {
    pub(super) fn new(conn: Conn, durability: Durability) -> Acked {
        Acked {
            conn,
            durability,
            wait: durability.command(),
        }
    }
}

/// `SCRIPT LOAD` (the script runner's fallback) writes no data: nothing to confirm, and on
/// Cluster it must keep its own routing (every node).
fn is_script_admin(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(Arg::Simple(name)) if name.eq_ignore_ascii_case(b"SCRIPT"))
}

fn not_durable(detail: String) -> RedisError {
    redis::make_extension_error(NOT_DURABLE.to_owned(), Some(detail))
}

impl Acked {
    /// Sends `pipeline` (not a transaction) followed by the confirming command and returns the
    /// replies of `pipeline` from `offset` (`count` of them), once confirmed.
    async fn confirmed(
        &mut self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
        wait: Cmd,
    ) -> redis::RedisResult<Vec<Value>> {
        let mut with_wait = pipeline.clone();
        with_wait.add_command(wait);
        let mode = self.durability.label();
        let started = Instant::now();
        let mut replies = match self
            .conn
            .req_packed_commands(&with_wait, offset, count + 1)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                crate::observability::record_durability_wait(mode, "error", started.elapsed());
                return Err(e);
            }
        };
        let wait_reply = replies.pop();
        // A write the server refused (NOSCRIPT, WRONGTYPE, ...) wrote nothing: hand its error
        // back as is, the caller's handling (the script runner's reload) applies.
        if replies.iter().any(|v| matches!(v, Value::ServerError(_))) {
            return Ok(replies);
        }
        let outcome = match wait_reply {
            Some(reply) => self.durability.check(&reply),
            None => Err(Short::Refused),
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok(()) => {
                crate::observability::record_durability_wait(mode, "confirmed", elapsed);
                Ok(replies)
            }
            Err(Short::Acks(what)) => {
                crate::observability::record_durability_wait(mode, "timeout", elapsed);
                Err(not_durable(format!(
                    "{what} within {} ms",
                    self.durability.timeout().as_millis()
                )))
            }
            Err(Short::Refused) => {
                crate::observability::record_durability_wait(mode, "refused", elapsed);
                Err(not_durable(format!(
                    "the server refused {} (WAITAOF needs Redis >= 7.2 and appendonly yes)",
                    self.durability.label().to_uppercase()
                )))
            }
        }
    }
}

impl ConnectionLike for Acked {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let wait = match &self.wait {
                Some(w) if !is_script_admin(cmd) => w.clone(),
                _ => return self.conn.req_packed_command(cmd).await,
            };
            let mut pipe = redis::pipe();
            pipe.add_command(cmd.clone());
            let mut replies = self.confirmed(&pipe, 0, 1, wait).await?;
            replies.pop().ok_or_else(|| {
                RedisError::from((redis::ErrorKind::Parse, "empty reply to a confirmed write"))
            })
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match &self.wait {
                // Inside MULTI, WAIT would not block (nothing confirmed): the store's writes are
                // scripts or single commands, never transactions, on this path.
                Some(_) if pipeline.is_transaction() => Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "transactions cannot be confirmed; write with a script",
                ))),
                Some(w) => {
                    let w = w.clone();
                    self.confirmed(pipeline, offset, count, w).await
                }
                None => self.conn.req_packed_commands(pipeline, offset, count).await,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(250);

    #[test]
    fn commands_carry_the_settings() {
        assert!(Durability::None.command().is_none());
        let w = Durability::Wait {
            replicas: 2,
            timeout: T,
        };
        let packed = String::from_utf8_lossy(
            &w.command()
                .map(|c| c.get_packed_command())
                .unwrap_or_default(),
        )
        .into_owned();
        assert!(
            packed.contains("WAIT") && packed.contains("\r\n2\r\n") && packed.contains("250"),
            "{packed}"
        );
        let a = Durability::WaitAof {
            local: 1,
            replicas: 0,
            timeout: Duration::ZERO,
        };
        let packed = String::from_utf8_lossy(
            &a.command()
                .map(|c| c.get_packed_command())
                .unwrap_or_default(),
        )
        .into_owned();
        // A zero timeout would block forever on the server: at least 1 ms.
        assert!(
            packed.contains("WAITAOF") && packed.ends_with("\r\n1\r\n"),
            "{packed}"
        );
    }

    #[test]
    fn replies_are_judged_against_what_was_asked() {
        let w = Durability::Wait {
            replicas: 2,
            timeout: T,
        };
        assert!(w.check(&Value::Int(2)).is_ok());
        assert!(w.check(&Value::Int(3)).is_ok());
        assert!(matches!(w.check(&Value::Int(1)), Err(Short::Acks(_))));
        assert!(matches!(w.check(&Value::Nil), Err(Short::Refused)));
        let a = Durability::WaitAof {
            local: 1,
            replicas: 1,
            timeout: T,
        };
        let pair = |l, r| Value::Array(vec![Value::Int(l), Value::Int(r)]);
        assert!(a.check(&pair(1, 1)).is_ok());
        assert!(matches!(a.check(&pair(0, 1)), Err(Short::Acks(_))));
        assert!(matches!(a.check(&pair(1, 0)), Err(Short::Acks(_))));
        assert!(matches!(a.check(&Value::Int(1)), Err(Short::Refused)));
    }

    #[test]
    fn script_load_is_not_confirmed() {
        assert!(is_script_admin(
            redis::cmd("SCRIPT").arg("LOAD").arg("return 1")
        ));
        assert!(is_script_admin(redis::cmd("script").arg("LOAD")));
        assert!(!is_script_admin(redis::cmd("EVALSHA").arg("abc").arg(0)));
    }
}
