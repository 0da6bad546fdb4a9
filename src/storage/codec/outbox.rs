//! Encodings of the outbox records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::ports::outbox::OutboxJob;
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{EndpointId, EventId};

/// A job as the backends store it: `<merchant> <event> <endpoint> <attempts>`, then
/// ` <subject>` when it is part of an in-order chain. Ids and subjects never contain spaces
/// (they are parsed, and subjects are made of id characters), so the encoding is unambiguous;
/// jobs written before subjects existed have four parts and decode without one.
pub(crate) fn encode_job(
    merchant: &MerchantId,
    event: &EventId,
    endpoint: &EndpointId,
    attempts: u32,
    subject: Option<&str>,
) -> String {
    match subject {
        Some(s) => format!("{merchant} {event} {endpoint} {attempts} {s}"),
        None => format!("{merchant} {event} {endpoint} {attempts}"),
    }
}

/// The job of `job`'s delivery as its chain holds it: the same with 0 attempts (what the
/// append wrote), so a finish can tell whether its event is the chain's head.
pub(crate) fn chain_entry(job: &OutboxJob) -> Option<String> {
    let s = job.subject.as_deref()?;
    Some(encode_job(
        &job.merchant,
        &job.event,
        &job.endpoint,
        0,
        Some(s),
    ))
}

/// Parses [`encode_job`]'s output; `None` for anything else.
pub(crate) fn decode_job(s: &str, handle: String) -> Option<OutboxJob> {
    let mut it = s.split(' ');
    let merchant = MerchantId::parse_tenant(it.next()?)?;
    let event = EventId::parse(it.next()?)?;
    let endpoint = EndpointId::parse(it.next()?)?;
    let attempts = it.next()?.parse().ok()?;
    let subject = match it.next() {
        Some(s) if is_subject(s) => Some(s.to_owned()),
        Some(_) => return None,
        None => None,
    };
    if it.next().is_some() {
        return None;
    }
    Some(OutboxJob {
        merchant,
        event,
        endpoint,
        attempts,
        subject,
        handle,
    })
}

/// What `WebhookEvent::subject` produces: a one-letter kind, `:`, id characters.
fn is_subject(s: &str) -> bool {
    s.len() > 2
        && s.len() <= 256
        && s.as_bytes()[1] == b':'
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// The job string for the attempt after `job`.
pub(crate) fn next_attempt(job: &OutboxJob) -> String {
    encode_job(
        &job.merchant,
        &job.event,
        &job.endpoint,
        job.attempts.saturating_add(1),
        job.subject.as_deref(),
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
        let s = encode_job(&m, &e, &w, 3, None);
        let j = decode_job(&s, "h".into()).unwrap();
        assert_eq!(
            (
                j.merchant.clone(),
                j.event.clone(),
                j.endpoint.clone(),
                j.attempts,
                j.subject.clone(),
            ),
            (m.clone(), e.clone(), w.clone(), 3, None)
        );
        assert!(next_attempt(&j).ends_with(" 4"));
        assert_eq!(chain_entry(&j), None);
        // With a subject: kept across attempts, and the chain entry is the 0-attempt form.
        let s = encode_job(&m, &e, &w, 2, Some("t:tok_abc"));
        let j = decode_job(&s, "h".into()).unwrap();
        assert_eq!(j.subject.as_deref(), Some("t:tok_abc"));
        assert!(next_attempt(&j).ends_with(" 3 t:tok_abc"));
        assert_eq!(
            chain_entry(&j),
            Some(encode_job(&m, &e, &w, 0, Some("t:tok_abc")))
        );
        assert!(decode_job(&format!("{s} x"), String::new()).is_none());
        for bad in ["x", "t:", "t:a b", "tt:a", "t:a\n"] {
            let s = format!("{m} {e} {w} 1 {bad}");
            assert!(decode_job(&s, String::new()).is_none(), "{bad}");
        }
        assert!(decode_job(&format!("{s} x"), String::new()).is_none());
        assert!(decode_job("mer_x evt_y whe_z 1", String::new()).is_none());
        assert!(decode_job("", String::new()).is_none());
    }
}
