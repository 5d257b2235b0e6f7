//! The client's real IP address.
//!
//! PocketBase binds a realtime client to the IP of its stream and refuses a
//! subscription POST from another IP. Behind a load balancer every request
//! comes from the proxy, so the real address is read from `X-Forwarded-For`,
//! but only when the direct peer is a configured trusted proxy: otherwise any
//! client could claim any address.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Resolves the real client IP of a request.
#[derive(Debug, Clone, Default)]
pub struct RealIp {
    trusted: Vec<IpNet>,
}

impl RealIp {
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self { trusted }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The peer itself unless it is a trusted proxy; then the right-most
    /// `X-Forwarded-For` entry that is not itself a trusted proxy.
    ///
    /// Entries may carry a port (`1.2.3.4:5555`, `[::1]:5555`). An entry
    /// that is not an address is an error (the request gets 400): falling
    /// back to the proxy's address would bind the client to an IP that
    /// every other client of that proxy shares.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> Result<IpAddr, BadForwardedFor> {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return Ok(peer);
        }
        let mut real = peer;
        // Several X-Forwarded-For headers form one list, in order.
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        if headers
            .get_all("x-forwarded-for")
            .iter()
            .any(|v| v.to_str().is_err())
        {
            return Err(BadForwardedFor);
        }
        for hop in hops.iter().rev() {
            real = canonical(parse_hop(hop).ok_or(BadForwardedFor)?);
            if !self.is_trusted(real) {
                break;
            }
        }
        Ok(real)
    }
}

/// An `X-Forwarded-For` entry that is not an IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid X-Forwarded-For header")]
pub struct BadForwardedFor;

/// `ip`, `ipv4:port`, `[ipv6]` or `[ipv6]:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let r = RealIp::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(r.resolve(peer, &headers("1.2.3.4")), Ok(peer));
        // Untrusted peers' headers are not read at all, even garbage.
        assert_eq!(r.resolve(peer, &headers("garbage")), Ok(peer));
    }

    #[test]
    fn trusted_proxies_are_skipped_right_to_left() {
        let r = RealIp::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            r.resolve(peer, &headers("6.6.6.6, 1.2.3.4, 10.1.1.1")),
            Ok("1.2.3.4".parse::<IpAddr>().unwrap())
        );
        assert_eq!(r.resolve(peer, &HeaderMap::new()), Ok(peer));
        assert_eq!(
            r.resolve("::ffff:127.0.0.1".parse().unwrap(), &headers("5.5.5.5")),
            Ok("5.5.5.5".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn entries_with_ports_parse_and_garbage_is_an_error() {
        let r = RealIp::new(vec!["127.0.0.1/32".parse().unwrap()]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let ip = |s: &str| Ok(s.parse::<IpAddr>().unwrap());
        assert_eq!(r.resolve(peer, &headers("9.9.9.9:5555")), ip("9.9.9.9"));
        assert_eq!(
            r.resolve(peer, &headers("[2001:db8::1]:443")),
            ip("2001:db8::1")
        );
        assert_eq!(
            r.resolve(peer, &headers("[2001:db8::1]")),
            ip("2001:db8::1")
        );
        assert_eq!(r.resolve(peer, &headers("garbage")), Err(BadForwardedFor));
        assert_eq!(
            r.resolve(peer, &headers("1.2.3.4, nope")),
            Err(BadForwardedFor)
        );
        assert_eq!(r.resolve(peer, &headers("")), Err(BadForwardedFor));
    }
}
