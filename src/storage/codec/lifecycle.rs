//! Encodings of the lifecycle records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::token::{MerchantId, TokenId};
use std::time::Duration;

/// Milliseconds, at least 1 (Redis refuses `PX 0`; a zero ttl would also mean "already gone").
pub(crate) fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Schedule members are `"<merchant id> <token id>"`: both ids are validated and contain no
/// space, so the split is unambiguous.
pub(crate) fn schedule_member(merchant: &MerchantId, token: &TokenId) -> String {
    format!("{} {}", merchant.as_str(), token.as_str())
}

/// Parses a schedule member; `None` for anything that is not two well-formed ids.
pub(crate) fn parse_schedule_member(s: &str) -> Option<(MerchantId, TokenId)> {
    let (m, t) = s.split_once(' ')?;
    Some((MerchantId::parse(m)?, TokenId::parse(t)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_members_round_trip_and_reject_junk() {
        let m = MerchantId::generate();
        let t = TokenId::generate();
        let s = schedule_member(&m, &t);
        assert_eq!(parse_schedule_member(&s), Some((m.clone(), t.clone())));
        assert_eq!(parse_schedule_member("junk"), None);
        assert_eq!(parse_schedule_member(&format!("{m} tok_x")), None);
        assert_eq!(parse_schedule_member(&format!("{t} {m}")), None);
    }

    #[test]
    fn ttl_is_never_zero() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_secs(2)), 2000);
    }
}
