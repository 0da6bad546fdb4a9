//! The timestamp of every log line, as tracing-subscriber's `SystemTime` writes it
//! (`2026-12-06T00:13:46.123456Z`: UTC, microseconds), with the date and time of day formatted
//! once per second per thread instead of once per line.
//!
//! Formatting the whole date-time (a calendar conversion and seven padded integers through
//! `fmt`) for each access-log line was about 1.3% of the gateway's CPU per GET
//! (docs/performance.md, "GET path, round 4"); within one second only the six digits of the
//! microseconds change.

use std::cell::Cell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// `YYYY-MM-DDTHH:MM:SS.`: the part of the timestamp that changes once a second.
const PREFIX: usize = 20;
/// The whole timestamp: the prefix, six digits of microseconds and `Z`.
const LEN: usize = PREFIX + 7;

thread_local! {
    /// The second (since the epoch) whose prefix is cached, and that prefix.
    static CACHE: Cell<(u64, [u8; PREFIX])> = const { Cell::new((u64::MAX, [0; PREFIX])) };
}

/// The `FormatTime` of every format (`log.format` text and JSON).
#[derive(Debug, Clone, Copy, Default)]
pub struct CachedSystemTime;

impl FormatTime for CachedSystemTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_at(w, SystemTime::now())
    }
}

/// `at` as tracing-subscriber's `SystemTime` formats it.
fn write_at(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let Ok(since) = at.duration_since(UNIX_EPOCH) else {
        // A clock before 1970: no cache, the stock formatter (it reads the clock again).
        return stock(w);
    };
    let secs = since.as_secs();
    let (cached, mut prefix) = CACHE.get();
    if cached != secs {
        match date_time_prefix(secs) {
            Some(p) => prefix = p,
            // Past the year 9999: the stock formatter's wider year.
            None => return stock(w),
        }
        CACHE.set((secs, prefix));
    }
    let mut buf = [0u8; LEN];
    buf[..PREFIX].copy_from_slice(&prefix);
    let mut micros = since.subsec_micros();
    for b in buf[PREFIX..LEN - 1].iter_mut().rev() {
        *b = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf[LEN - 1] = b'Z';
    w.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
}

fn stock(w: &mut impl fmt::Write) -> fmt::Result {
    let mut s = String::with_capacity(32);
    tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut s))?;
    w.write_str(&s)
}

/// `YYYY-MM-DDTHH:MM:SS.` of the second `secs` after the epoch (UTC); `None` past 9999.
fn date_time_prefix(secs: u64) -> Option<[u8; PREFIX]> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    if t.year() > 9999 {
        return None;
    }
    let mut out = [0u8; PREFIX];
    let mut at = 0;
    let mut put = |value: u32, digits: u32, sep: u8| {
        for i in (0..digits).rev() {
            out[at] = b'0' + (value / 10u32.pow(i) % 10) as u8;
            at += 1;
        }
        out[at] = sep;
        at += 1;
    };
    put(u32::try_from(t.year()).ok()?, 4, b'-');
    put(u32::from(u8::from(t.month())), 2, b'-');
    put(u32::from(t.day()), 2, b'T');
    put(u32::from(t.hour()), 2, b':');
    put(u32::from(t.minute()), 2, b':');
    put(u32::from(t.second()), 2, b'.');
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        write_at(
            &mut s,
            UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999),
        )
        .unwrap();
        s
    }

    /// An independent formatter for the same text: the `time` crate's format description.
    fn reference(secs: u64, micros: u32) -> String {
        let f = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        (time::OffsetDateTime::UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999))
            .format(&f)
            .unwrap()
    }

    #[test]
    fn instants_including_second_boundaries_are_formatted_like_the_reference() {
        let instants: &[(u64, u32)] = &[
            (0, 0),
            (1_764_979_199, 999_999), // 2025-12-05T23:59:59.999999Z
            (1_764_979_200, 0),       // the next second, day and the cache's next prefix
            (1_764_979_200, 1),
            (1_764_979_199, 5),     // a clock stepped back: the older second again
            (951_782_399, 999_999), // 2000-02-28T23:59:59.999999Z
            (951_782_400, 0),       // 2000-02-29, a leap day of a year divisible by 400
            (4_107_542_399, 999_999), // 2100-02-28, not a leap year
            (4_107_542_400, 0),
            (253_402_300_799, 999_999), // 9999-12-31T23:59:59.999999Z
        ];
        for &(secs, micros) in instants {
            assert_eq!(at(secs, micros), reference(secs, micros), "{secs}.{micros}");
        }
        assert_eq!(at(1_764_979_199, 999_999), "2025-12-05T23:59:59.999999Z");
        assert_eq!(at(1_764_979_200, 42), "2025-12-06T00:00:00.000042Z");
        // Every microsecond position of one second, through the cache.
        for micros in (0..1_000_000).step_by(7919) {
            assert_eq!(at(1_764_979_200, micros), reference(1_764_979_200, micros));
        }
    }

    #[test]
    fn past_the_year_9999_the_stock_formatter_writes() {
        assert!(date_time_prefix(253_402_300_800).is_none());
        // Its text then starts with the current year (the stock formatter reads the clock).
        let s = at(253_402_300_800, 0);
        assert!(s.ends_with('Z') && s.len() == LEN, "{s}");
    }

    /// Against tracing-subscriber's own `SystemTime` (which formats only "now"): read in turn,
    /// ours must fall between two of its readings, over a change of second.
    #[test]
    fn now_is_between_two_readings_of_the_stock_formatter() {
        let stock_now = || {
            let mut s = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut s))
                .unwrap();
            s
        };
        let ours_now = || {
            let mut s = String::new();
            CachedSystemTime
                .format_time(&mut Writer::new(&mut s))
                .unwrap();
            s
        };
        let start = stock_now();
        let mut crossed = false;
        while !crossed {
            let a = stock_now();
            let b = ours_now();
            let c = stock_now();
            assert_eq!(a.len(), b.len());
            // Same-length RFC 3339 UTC texts sort as their instants do.
            assert!(a <= b && b <= c, "{a} {b} {c}");
            crossed = a[..19] != start[..19] && b[..19] == a[..19];
            std::thread::sleep(Duration::from_micros(300));
        }
    }
}
