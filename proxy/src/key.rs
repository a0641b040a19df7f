//! Request identity: the real client address (trusting forwarding headers only from
//! configured proxies) and the consistent-hash key from the ordered list of sources.

use http::HeaderMap;
use ringcast_shared::config::{HashSource, parse_network};
use std::net::IpAddr;

/// Networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses the validated `server.trusted_proxies` list (bad entries are skipped).
    pub fn new(entries: &[String]) -> Self {
        Self(
            entries
                .iter()
                .filter_map(|e| parse_network(e).ok())
                .collect(),
        )
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .iter()
            .any(|(net, prefix)| in_network(ip, *net, *prefix))
    }

    /// The client address: the peer itself, or (when the peer is trusted) the rightmost
    /// address of `X-Forwarded-For` that is not a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let chain: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|part| part.trim().parse().ok())
            .collect();
        chain
            .iter()
            .rev()
            .find(|ip| !self.contains(**ip))
            .or(chain.first())
            .copied()
            .unwrap_or(peer)
    }
}

fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// The value of query parameter `name` in `query` (raw, not percent-decoded).
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value)
}

/// The hash key: the first source present in the request; the client IP as a fallback.
pub fn hash_key(
    sources: &[HashSource],
    query: Option<&str>,
    headers: &HeaderMap,
    client: IpAddr,
) -> Vec<u8> {
    for source in sources {
        let found = match source {
            HashSource::Query(name) => query.and_then(|q| query_param(q, name)),
            HashSource::Header(name) => headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty()),
            HashSource::Cookie(name) => cookie(headers, name),
            HashSource::ClientIp => return client.to_string().into_bytes(),
        };
        if let Some(value) = found {
            return value.as_bytes().to_vec();
        }
    }
    client.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn sources_are_tried_in_order() {
        let sources = [
            HashSource::Query("sid".into()),
            HashSource::Header("x-room".into()),
            HashSource::Cookie("io".into()),
            HashSource::ClientIp,
        ];
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let h = headers(&[("cookie", "a=1; io=abc"), ("x-room", "lobby")]);
        assert_eq!(hash_key(&sources, Some("EIO=4&sid=s1"), &h, ip), b"s1");
        assert_eq!(hash_key(&sources, Some("EIO=4"), &h, ip), b"lobby");
        let h = headers(&[("cookie", "a=1; io=abc")]);
        assert_eq!(hash_key(&sources, None, &h, ip), b"abc");
        assert_eq!(
            hash_key(&sources, None, &HeaderMap::new(), ip),
            b"192.0.2.1"
        );
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let trusted = TrustedProxies::new(&["10.0.0.0/8".to_owned()]);
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.1.1.1")]);
        let proxy: IpAddr = "10.2.2.2".parse().unwrap();
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            trusted.client_ip(proxy, &h),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(trusted.client_ip(stranger, &h), stranger);
    }
}
