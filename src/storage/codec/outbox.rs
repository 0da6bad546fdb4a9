//! Encodings of the outbox records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::ports::outbox::OutboxJob;
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{EndpointId, EventId};

/// A job as the backends store it: `<merchant> <event> <endpoint> <attempts>`. Ids never
/// contain spaces (they are parsed), so the encoding is unambiguous.
pub(crate) fn encode_job(
    merchant: &MerchantId,
    event: &EventId,
    endpoint: &EndpointId,
    attempts: u32,
) -> String {
    format!("{merchant} {event} {endpoint} {attempts}")
}

/// Parses [`encode_job`]'s output; `None` for anything else.
pub(crate) fn decode_job(s: &str, handle: String) -> Option<OutboxJob> {
    let mut it = s.split(' ');
    let merchant = MerchantId::parse_tenant(it.next()?)?;
    let event = EventId::parse(it.next()?)?;
    let endpoint = EndpointId::parse(it.next()?)?;
    let attempts = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(OutboxJob {
        merchant,
        event,
        endpoint,
        attempts,
        handle,
    })
}

/// The job string for the attempt after `job`.
pub(crate) fn next_attempt(job: &OutboxJob) -> String {
    encode_job(
        &job.merchant,
        &job.event,
        &job.endpoint,
        job.attempts.saturating_add(1),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_and_reject_garbage() {
        let m = MerchantId::generate();
        let e = EventId::generate(time::OffsetDateTime::now_utc());
        let w = EndpointId::generate();
        let s = encode_job(&m, &e, &w, 3);
        let j = decode_job(&s, "h".into()).unwrap();
        assert_eq!(
            (
                j.merchant.clone(),
                j.event.clone(),
                j.endpoint.clone(),
                j.attempts
            ),
            (m, e, w, 3)
        );
        assert!(next_attempt(&j).ends_with(" 4"));
        assert!(decode_job(&format!("{s} x"), String::new()).is_none());
        assert!(decode_job("mer_x evt_y whe_z 1", String::new()).is_none());
        assert!(decode_job("", String::new()).is_none());
    }
}
