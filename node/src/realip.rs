//! The client's real IP address.
//!
//! PocketBase binds a realtime client to the IP of its stream and refuses a
//! subscription POST from another IP. Behind a load balancer every request
//! comes from the proxy, so the real address is read from `X-Forwarded-For`,
//! but only when the direct peer is a configured trusted proxy: otherwise any
//! client could claim any address.

use std::net::IpAddr;

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
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
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
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    real = canonical(ip);
                    if !self.is_trusted(real) {
                        break;
                    }
                }
                // A malformed entry ends the trusted chain: keep what we have.
                Err(_) => break,
            }
        }
        real
    }
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
        assert_eq!(r.resolve(peer, &headers("1.2.3.4")), peer);
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
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.resolve(peer, &HeaderMap::new()), peer);
        assert_eq!(
            r.resolve("::ffff:127.0.0.1".parse().unwrap(), &headers("5.5.5.5")),
            "5.5.5.5".parse::<IpAddr>().unwrap()
        );
    }
}
