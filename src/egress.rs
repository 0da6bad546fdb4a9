//! The SSRF guard: which addresses the gateway may connect to on a merchant's behalf (webhook
//! receivers). Checked when an endpoint is registered and again, on freshly resolved addresses,
//! at every delivery.
//!
//! A merchant chooses the URL but the gateway makes the request, from inside the PSP's network:
//! without this guard a webhook URL could reach cloud metadata (`169.254.169.254`), internal
//! services, or the gateway itself. So:
//!
//! - every address a host name resolves to is classified ([`classify`]); one refused address
//!   refuses the name (a name with a public and a private address must not get a chance to fall
//!   back to the private one);
//! - names are resolved through an injectable [`Resolve`] (tests make names resolve to each
//!   class), and the delivery connector (`crate::webhook_sender`) connects to the addresses
//!   checked here, never resolving again: a DNS-rebinding name cannot answer a public address
//!   to the check and a private one to the connection;
//! - operators can open internal networks explicitly ([`EgressPolicy::new`],
//!   `webhooks.allow_private_networks`), and sandbox mode keeps loopback open for local
//!   receivers. Nothing opens the gateway's own listeners, multicast, broadcast or unspecified
//!   addresses.
//!
//! `docs/security.md` ("Outbound requests: the SSRF guard") is the operator-facing description.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an address is refused. [`AddrClass::as_str`] is what API errors and delivery codes show;
/// the address itself is never shown (it may describe the PSP's internal network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), deprecated IPv6 site-local `fec0::/10`, and
    /// the local-use NAT64 prefix `64:ff9b:1::/48` (it translates into the operator's network).
    Private,
    /// `169.254.0.0/16` (cloud metadata lives there), `fe80::/10`.
    LinkLocal,
    /// `100.64.0.0/10`, carrier-grade NAT (RFC 6598): the provider's side of a NAT.
    SharedCgnat,
    /// `fc00::/7` (RFC 4193).
    UniqueLocal,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `0.0.0.0`, `::`: connecting there reaches the local host.
    Unspecified,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// Everything else that is not globally routable unicast: `0/8`, `192.0.0/24`, benchmarking
    /// `198.18/15`, the retired 6to4 relay `192.88.99/24`, `240/4`; IPv6 outside `2000::/3`,
    /// `2001::/23` (Teredo, ORCHID, benchmarking), the discard prefix `100::/64`, and the
    /// deprecated IPv4-compatible form `::a.b.c.d`.
    Reserved,
    /// An address and port the gateway itself (or its sandbox simulator) listens on.
    OwnListener,
}

impl AddrClass {
    /// Stable snake_case name (delivery codes are `forbidden_address_<name>`).
    pub fn as_str(&self) -> &'static str {
        match self {
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::LinkLocal => "link_local",
            AddrClass::SharedCgnat => "shared_cgnat",
            AddrClass::UniqueLocal => "unique_local",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Documentation => "documentation",
            AddrClass::Reserved => "reserved",
            AddrClass::OwnListener => "own_listener",
        }
    }

    /// For humans, e.g. in a problem `detail`.
    pub fn describe(&self) -> &'static str {
        match self {
            AddrClass::Loopback => "a loopback address",
            AddrClass::Private => "a private network address",
            AddrClass::LinkLocal => "a link-local address (such as cloud metadata services)",
            AddrClass::SharedCgnat => "a carrier-grade NAT (shared) address",
            AddrClass::UniqueLocal => "an IPv6 unique-local address",
            AddrClass::Multicast => "a multicast address",
            AddrClass::Broadcast => "the broadcast address",
            AddrClass::Unspecified => "the unspecified address",
            AddrClass::Documentation => "a documentation address",
            AddrClass::Reserved => "a reserved address",
            AddrClass::OwnListener => "the gateway's own listener",
        }
    }

    /// Classes no configuration opens: nothing legitimate receives webhooks there, and the
    /// gateway posting to itself (or to its simulator's control API) is the attack.
    fn always_refused(&self) -> bool {
        matches!(
            self,
            AddrClass::Multicast
                | AddrClass::Broadcast
                | AddrClass::Unspecified
                | AddrClass::OwnListener
        )
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// --- classification ----------------------------------------------------------------------------

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// IPv4 ranges refused, from the IANA special-purpose registry. `0.0.0.0` and
/// `255.255.255.255` are matched first (they are inside `0/8` and `240/4`).
const V4_RANGES: [(Ipv4Net, AddrClass); 15] = [
    (v4(0, 0, 0, 0, 8), AddrClass::Reserved),
    (v4(10, 0, 0, 0, 8), AddrClass::Private),
    (v4(100, 64, 0, 0, 10), AddrClass::SharedCgnat),
    (v4(127, 0, 0, 0, 8), AddrClass::Loopback),
    (v4(169, 254, 0, 0, 16), AddrClass::LinkLocal),
    (v4(172, 16, 0, 0, 12), AddrClass::Private),
    (v4(192, 0, 0, 0, 24), AddrClass::Reserved),
    (v4(192, 0, 2, 0, 24), AddrClass::Documentation),
    (v4(192, 88, 99, 0, 24), AddrClass::Reserved),
    (v4(192, 168, 0, 0, 16), AddrClass::Private),
    (v4(198, 18, 0, 0, 15), AddrClass::Reserved),
    (v4(198, 51, 100, 0, 24), AddrClass::Documentation),
    (v4(203, 0, 113, 0, 24), AddrClass::Documentation),
    (v4(224, 0, 0, 0, 4), AddrClass::Multicast),
    (v4(240, 0, 0, 0, 4), AddrClass::Reserved),
];

/// IPv6 ranges refused by name; anything else outside `2000::/3` is [`AddrClass::Reserved`].
/// Prefixes embedding an IPv4 address are handled before this table ([`embedded_v4`]).
const V6_RANGES: [(Ipv6Net, AddrClass); 9] = [
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), AddrClass::Private),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), AddrClass::Reserved),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        AddrClass::Documentation,
    ),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), AddrClass::Reserved),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        AddrClass::Documentation,
    ),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), AddrClass::UniqueLocal),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), AddrClass::LinkLocal),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), AddrClass::Private),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), AddrClass::Multicast),
];

const GLOBAL_UNICAST_V6: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

/// How an IPv6 address carries an IPv4 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    /// `::ffff:a.b.c.d` (IPv4-mapped), `::ffff:0:a.b.c.d` (SIIT), `64:ff9b::a.b.c.d` (NAT64
    /// well-known prefix), `2002:AABB:CCDD::/48` (6to4): traffic reaches the IPv4 address, so the
    /// IPv4 address decides.
    Translated,
    /// `::a.b.c.d` (IPv4-compatible, deprecated by RFC 4291): refused even for a public IPv4.
    Compatible,
}

fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, Embedding)> {
    let s = ip.segments();
    let o = ip.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => {
            Some((low, Embedding::Translated))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((low, Embedding::Translated)),
        [0x2002, _, _, ..] => Some((Ipv4Addr::new(o[2], o[3], o[4], o[5]), Embedding::Translated)),
        // `::` and `::1` are classified before; every other `::/96` address is compatible.
        [0, 0, 0, 0, 0, 0, _, _] => Some((low, Embedding::Compatible)),
        _ => None,
    }
}

/// The class of `ip` if it is refused by default, `None` for a globally routable unicast
/// address. IPv6 forms of IPv4 addresses are classified by the IPv4 address they carry, so
/// `[::ffff:127.0.0.1]` is loopback and `[64:ff9b::a9fe:a9fe]` link-local.
pub fn classify(ip: IpAddr) -> Option<AddrClass> {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddrClass> {
    if ip.is_unspecified() {
        return Some(AddrClass::Unspecified);
    }
    if ip.is_broadcast() {
        return Some(AddrClass::Broadcast);
    }
    V4_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddrClass> {
    if ip.is_unspecified() {
        return Some(AddrClass::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddrClass::Loopback);
    }
    if let Some((v4, how)) = embedded_v4(ip) {
        return match (classify_v4(v4), how) {
            (Some(class), _) => Some(class),
            (None, Embedding::Compatible) => Some(AddrClass::Reserved),
            (None, Embedding::Translated) => None,
        };
    }
    if let Some((_, class)) = V6_RANGES.iter().find(|(net, _)| net.contains(&ip)) {
        return Some(*class);
    }
    (!GLOBAL_UNICAST_V6.contains(&ip)).then_some(AddrClass::Reserved)
}

/// `localhost` and `*.localhost` are loopback by definition (RFC 6761): they are not sent to
/// the resolver, so no resolver configuration can turn them into something else.
fn is_localhost_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

// --- policy ------------------------------------------------------------------------------------

/// Which refused classes a deployment opens, and which listeners are the gateway's own.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
    allow_loopback: bool,
    own: Vec<SocketAddr>,
}

impl EgressPolicy {
    /// `allow`: networks opened by configuration (`webhooks.allow_private_networks`);
    /// `allow_loopback`: sandbox mode, where receivers run next to the gateway.
    pub fn new(allow: Vec<IpNet>, allow_loopback: bool) -> EgressPolicy {
        EgressPolicy {
            allow,
            allow_loopback,
            own: Vec::new(),
        }
    }

    /// Adds the gateway's own listeners (API, sandbox simulator): always refused.
    pub fn with_own_listeners(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.own.extend(addrs);
        self
    }

    /// Whether the gateway may connect to `addr`; the refusal's class otherwise.
    pub fn check(&self, addr: SocketAddr) -> Result<(), AddrClass> {
        // Mapped IPv6 forms compare equal to the IPv4 address they reach.
        let ip = addr.ip().to_canonical();
        if self.is_own(ip, addr.port()) {
            return Err(AddrClass::OwnListener);
        }
        let Some(class) = classify(ip) else {
            return Ok(());
        };
        if class.always_refused() {
            return Err(class);
        }
        if class == AddrClass::Loopback && self.allow_loopback {
            return Ok(());
        }
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        Err(class)
    }

    /// A listener on a specific address is reached at that address; one on a wildcard address
    /// at every address of the host, of which we refuse the non-public ones (the host's public
    /// addresses are not known here: docs/security.md says so).
    fn is_own(&self, ip: IpAddr, port: u16) -> bool {
        self.own.iter().any(|l| {
            let lip = l.ip().to_canonical();
            l.port() == port && (lip == ip || (lip.is_unspecified() && classify(ip).is_some()))
        })
    }
}

// --- resolution --------------------------------------------------------------------------------

/// Name resolution, injectable so tests can make a name resolve to any class (and change its
/// answer between registration and delivery, like a rebinding attacker).
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host` resolves to; the port is the caller's business.
    async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo` on a blocking thread, through tokio's `lookup_host`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, 0))
            .await?
            .map(|a| a.ip())
            .collect())
    }
}

/// Why no address of a host may be used.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// One of the host's addresses is refused.
    #[error("refused: the host is or resolves to {}", .0.describe())]
    Forbidden(AddrClass),
    #[error("name resolution failed")]
    Resolve(#[source] io::Error),
    #[error("the name resolves to no address")]
    NoAddress,
}

/// The policy with the resolver it checks names through; shared by registration and delivery.
pub struct Egress {
    policy: EgressPolicy,
    resolver: Arc<dyn Resolve>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Egress {
    pub fn new(policy: EgressPolicy, resolver: Arc<dyn Resolve>) -> Egress {
        Egress { policy, resolver }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The addresses to connect to for `host:port` (`host` as in a URL: an IPv6 literal may keep
    /// its brackets): all of them allowed, or the refusal. Connect to these and nothing else.
    pub async fn resolve_checked(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, EgressError> {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ips = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if is_localhost_name(host) {
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]
        } else {
            self.resolver
                .resolve(host)
                .await
                .map_err(EgressError::Resolve)?
        };
        if ips.is_empty() {
            return Err(EgressError::NoAddress);
        }
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(ips.len());
        for ip in ips {
            let addr = SocketAddr::new(ip, port);
            self.policy.check(addr).map_err(EgressError::Forbidden)?;
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        Ok(addrs)
    }
}

/// Test resolvers: a fixed table that can be changed while a gateway runs.
pub mod testing {
    use std::collections::HashMap;
    use std::io;
    use std::net::IpAddr;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::Resolve;

    /// Answers from a table; unknown names fail like NXDOMAIN. [`StaticResolver::set`] changes
    /// an answer at run time (DNS rebinding in tests).
    #[derive(Debug, Default)]
    pub struct StaticResolver {
        table: Mutex<HashMap<String, Vec<IpAddr>>>,
    }

    impl StaticResolver {
        pub fn new() -> StaticResolver {
            StaticResolver::default()
        }

        /// `host` now resolves to `ips`.
        pub fn set(&self, host: &str, ips: &[IpAddr]) {
            // A poisoned lock only means another test thread panicked; the table is still usable.
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.insert(host.to_ascii_lowercase(), ips.to_vec());
        }
    }

    #[async_trait]
    impl Resolve for StaticResolver {
        async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.get(&host.to_ascii_lowercase()).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name not in the test table")
            })
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::testing::StaticResolver;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifier_covers_every_class() {
        use AddrClass::*;
        let cases: &[(&str, Option<AddrClass>)] = &[
            // IPv4
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("169.254.169.254", Some(LinkLocal)),
            ("100.64.0.1", Some(SharedCgnat)),
            ("100.127.255.254", Some(SharedCgnat)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Reserved)),
            ("192.0.0.170", Some(Reserved)),
            ("192.0.2.10", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.99", Some(Documentation)),
            ("198.18.0.1", Some(Reserved)),
            ("192.88.99.1", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            // IPv4, public (including the neighbours of refused ranges)
            ("8.8.8.8", None),
            ("93.184.215.14", None),
            ("172.32.0.1", None),
            ("172.15.255.255", None),
            ("100.128.0.1", None),
            ("169.253.255.255", None),
            ("11.0.0.1", None),
            ("223.255.255.255", None),
            // IPv6
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fc00::1", Some(UniqueLocal)),
            ("fd12:3456::1", Some(UniqueLocal)),
            ("fec0::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("2001::1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            ("64:ff9b:1::a00:1", Some(Private)),
            ("2606:4700::1111", None),
            ("2a00:1450:4001::200e", None),
            // IPv4-mapped, SIIT, NAT64, 6to4 and IPv4-compatible forms
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.0.0.1", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:8.8.8.8", None),
            ("::ffff:0:10.0.0.1", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("64:ff9b::808:808", None),
            ("2002:c0a8:0101::1", Some(Private)),
            ("2002:0808:0808::1", None),
            ("::127.0.0.1", Some(Loopback)),
            ("::10.0.0.1", Some(Private)),
            ("::8.8.8.8", Some(Reserved)),
        ];
        for (addr, want) in cases {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn url_literals_parse_to_the_classified_form() {
        // What the connector sees for `https://[::ffff:127.0.0.1]/`: http::Uri keeps the
        // brackets, resolve_checked strips them and parses the literal.
        let uri: http::Uri = "https://[::ffff:127.0.0.1]:8443/x".parse().unwrap();
        let host = uri.host().unwrap();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        assert_eq!(classify(ip(bare)), Some(AddrClass::Loopback));
        // Non-canonical IPv4 spellings are not addresses to the parser: they go to the resolver,
        // whose answer is checked like any other.
        assert!("0x7f.1".parse::<IpAddr>().is_err());
        assert!("2130706433".parse::<IpAddr>().is_err());
    }

    #[test]
    fn policy_exceptions() {
        let public: SocketAddr = "93.184.215.14:443".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let lo_mapped: SocketAddr = "[::ffff:127.0.0.1]:9000".parse().unwrap();
        let internal: SocketAddr = "10.20.3.4:443".parse().unwrap();
        let internal_mapped: SocketAddr = "[::ffff:10.20.3.4]:443".parse().unwrap();
        let other: SocketAddr = "10.30.0.1:443".parse().unwrap();

        let prod = EgressPolicy::new(Vec::new(), false);
        assert_eq!(prod.check(public), Ok(()));
        assert_eq!(prod.check(lo), Err(AddrClass::Loopback));
        assert_eq!(prod.check(lo_mapped), Err(AddrClass::Loopback));
        assert_eq!(prod.check(internal), Err(AddrClass::Private));

        // Sandbox: loopback only.
        let sandbox = EgressPolicy::new(Vec::new(), true);
        assert_eq!(sandbox.check(lo), Ok(()));
        assert_eq!(sandbox.check(lo_mapped), Ok(()));
        assert_eq!(sandbox.check(internal), Err(AddrClass::Private));

        // The allow-list opens its networks (mapped forms included), and nothing else.
        let listed = EgressPolicy::new(vec!["10.20.0.0/16".parse().unwrap()], false);
        assert_eq!(listed.check(internal), Ok(()));
        assert_eq!(listed.check(internal_mapped), Ok(()));
        assert_eq!(listed.check(other), Err(AddrClass::Private));
        assert_eq!(listed.check(lo), Err(AddrClass::Loopback));

        // Some classes no list opens.
        let wide = EgressPolicy::new(
            vec![
                "0.0.0.0/1".parse().unwrap(),
                "128.0.0.0/1".parse().unwrap(),
                "ff00::/8".parse().unwrap(),
            ],
            true,
        );
        for (a, class) in [
            ("0.0.0.0:80", AddrClass::Unspecified),
            ("255.255.255.255:80", AddrClass::Broadcast),
            ("224.0.0.1:80", AddrClass::Multicast),
            ("[ff02::1]:80", AddrClass::Multicast),
        ] {
            assert_eq!(wide.check(a.parse().unwrap()), Err(class), "{a}");
        }
        assert_eq!(wide.check(internal), Ok(()));
    }

    #[test]
    fn own_listeners_are_refused_even_when_open() {
        let policy = EgressPolicy::new(vec!["10.20.0.0/16".parse().unwrap()], true)
            .with_own_listeners([
                "127.0.0.1:8080".parse().unwrap(),
                "0.0.0.0:8765".parse().unwrap(),
                "10.20.0.5:9443".parse().unwrap(),
            ]);
        let refused = [
            "127.0.0.1:8080",
            "[::ffff:127.0.0.1]:8080",
            "127.0.0.1:8765",
            "[::1]:8765",
            "10.1.1.1:8765",
            "10.20.0.5:9443",
        ];
        for a in refused {
            assert_eq!(
                policy.check(a.parse().unwrap()),
                Err(AddrClass::OwnListener),
                "{a}"
            );
        }
        // Other ports of the same hosts are ordinary receivers.
        for a in ["127.0.0.1:8081", "10.20.0.5:443", "127.0.0.2:8080"] {
            assert_eq!(policy.check(a.parse().unwrap()), Ok(()), "{a}");
        }
    }

    #[tokio::test]
    async fn names_are_checked_on_every_address() {
        let dns = Arc::new(StaticResolver::new());
        dns.set("public.test", &[ip("93.184.215.14"), ip("2606:4700::1111")]);
        dns.set("metadata.test", &[ip("169.254.169.254")]);
        dns.set("mixed.test", &[ip("93.184.215.14"), ip("192.168.1.10")]);
        dns.set("empty.test", &[]);
        let egress = Egress::new(EgressPolicy::new(Vec::new(), false), dns.clone());

        let addrs = egress.resolve_checked("public.test", 443).await.unwrap();
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|a| a.port() == 443));
        for (host, class) in [
            ("metadata.test", AddrClass::LinkLocal),
            ("mixed.test", AddrClass::Private),
            ("[::ffff:127.0.0.1]", AddrClass::Loopback),
            ("[fe80::1]", AddrClass::LinkLocal),
            ("10.0.0.1", AddrClass::Private),
            ("localhost", AddrClass::Loopback),
            ("api.LOCALHOST.", AddrClass::Loopback),
        ] {
            match egress.resolve_checked(host, 443).await {
                Err(EgressError::Forbidden(c)) => assert_eq!(c, class, "{host}"),
                other => panic!("{host}: {other:?}"),
            }
        }
        assert!(matches!(
            egress.resolve_checked("empty.test", 443).await,
            Err(EgressError::NoAddress)
        ));
        assert!(matches!(
            egress.resolve_checked("unknown.test", 443).await,
            Err(EgressError::Resolve(_))
        ));
        // Rebinding: the same name, a new answer, a new verdict.
        dns.set("public.test", &[ip("10.0.0.7")]);
        assert!(matches!(
            egress.resolve_checked("public.test", 443).await,
            Err(EgressError::Forbidden(AddrClass::Private))
        ));
    }
}
