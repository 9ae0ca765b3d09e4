//! Where the bench may send traffic: loopback only.
//!
//! Load and failure tests on this project's machines must never leave the
//! machine, so every server URL and every source address is checked here,
//! once, before a single socket is opened.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::http::Uri;

use crate::protocol::Offset;
use crate::{Error, Result};

/// The WebSocket endpoint of one pod, already validated to be on loopback.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// The URL as the user gave it, for reports.
    pub url: String,
    /// The resolved loopback socket address to connect to.
    pub addr: SocketAddr,
    /// `host:port` as written, used for the `Host` header and HTTP base URL.
    pub authority: String,
    /// Path plus any query the user gave (e.g. `/ws?token=..`); the bench
    /// appends `session` and `last` to it.
    pub path_and_query: String,
}

impl Target {
    /// Parses and validates a `ws://` URL; the path defaults to `/ws`.
    pub fn parse_ws(url: &str) -> Result<Target> {
        let (addr, authority, path_and_query) = parse_loopback(url, "ws", 80)?;
        let path_and_query = if path_and_query.is_empty() || path_and_query == "/" {
            "/ws".to_string()
        } else {
            path_and_query
        };
        Ok(Target {
            url: url.to_string(),
            addr,
            authority,
            path_and_query,
        })
    }

    /// The URL to upgrade for `session`, resuming after `last` if given.
    pub fn ws_url(&self, session: &str, last: Option<Offset>) -> String {
        format!(
            "ws://{}{}",
            self.authority,
            self.request_path(session, last)
        )
    }

    /// The request target (path and query) of the upgrade for `session`,
    /// resuming after `last` if given.
    pub fn request_path(&self, session: &str, last: Option<Offset>) -> String {
        let sep = if self.path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        match last {
            Some(last) => format!("{}{sep}session={session}&last={last}", self.path_and_query),
            None => format!("{}{sep}session={session}", self.path_and_query),
        }
    }

    /// The HTTP API base of the same pod (`http://host:port`).
    pub fn http_base(&self) -> String {
        format!("http://{}", self.authority)
    }
}

/// Validates an `http://` base URL (for `--http-target`) and returns it
/// without a trailing slash.
pub fn parse_http_base(url: &str) -> Result<String> {
    let (_, authority, _) = parse_loopback(url, "http", 80)?;
    Ok(format!("http://{authority}"))
}

/// Parses `url` with `scheme`, refusing any host that is not loopback.
fn parse_loopback(
    url: &str,
    scheme: &str,
    default_port: u16,
) -> Result<(SocketAddr, String, String)> {
    let invalid = |reason: &str| Error::InvalidTarget {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    if uri.scheme_str() != Some(scheme) {
        return Err(invalid(&format!("scheme must be {scheme}://")));
    }
    let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(default_port);
    let ip = loopback_ip(host).ok_or_else(|| Error::NotLoopback(url.to_string()))?;
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    Ok((
        SocketAddr::new(ip, port),
        authority.as_str().to_string(),
        path_and_query,
    ))
}

/// `localhost`, any 127.0.0.0/8 address or `::1`; anything else is refused.
fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) if v4.is_loopback() => Some(IpAddr::V4(v4)),
        IpAddr::V6(v6) if v6 == Ipv6Addr::LOCALHOST => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// Parses `--source-ips`: addresses or ranges (`127.0.0.2-127.0.0.40` or
/// `127.0.0.2-40`), all in 127.0.0.0/8. Distinct source addresses each get
/// their own ~28k ephemeral ports, which is what lets one machine hold more
/// than ~28k connections to one server `ip:port`.
pub fn parse_source_ips(items: &[String]) -> Result<Vec<Ipv4Addr>> {
    const MAX: usize = 4096;
    let mut out = Vec::new();
    for item in items.iter().flat_map(|s| s.split(',')).map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let bad = |reason: &str| Error::InvalidTarget {
            url: item.to_string(),
            reason: reason.to_string(),
        };
        let (first, last) = match item.split_once('-') {
            None => {
                let ip: Ipv4Addr = item.parse().map_err(|_| bad("not an IPv4 address"))?;
                (ip, ip)
            }
            Some((a, b)) => {
                let a: Ipv4Addr = a.parse().map_err(|_| bad("range start is not IPv4"))?;
                let b: Ipv4Addr = if b.contains('.') {
                    b.parse().map_err(|_| bad("range end is not IPv4"))?
                } else {
                    let octet: u8 = b.parse().map_err(|_| bad("range end is not 0-255"))?;
                    let [x, y, z, _] = a.octets();
                    Ipv4Addr::new(x, y, z, octet)
                };
                (a, b)
            }
        };
        let (lo, hi) = (u32::from(first), u32::from(last));
        if lo > hi {
            return Err(bad("range end before start"));
        }
        for n in lo..=hi {
            let ip = Ipv4Addr::from(n);
            if !ip.is_loopback() {
                return Err(Error::NotLoopback(ip.to_string()));
            }
            out.push(ip);
            if out.len() > MAX {
                return Err(Error::InvalidParam(format!(
                    "more than {MAX} source addresses"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_targets_only() {
        for ok in [
            "ws://127.0.0.1:8080/ws",
            "ws://localhost:9000",
            "ws://127.3.4.5:1/ws?token=x",
            "ws://[::1]:8080/ws",
        ] {
            assert!(Target::parse_ws(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ws://10.0.0.1:8080/ws",
            "ws://192.168.1.1/ws",
            "ws://example.com/ws",
            "ws://8.8.8.8/ws",
            "ws://[::2]:80/",
        ] {
            assert!(
                matches!(Target::parse_ws(bad), Err(Error::NotLoopback(_))),
                "{bad}"
            );
        }
        assert!(Target::parse_ws("http://127.0.0.1/ws").is_err());
        assert!(parse_http_base("http://10.1.1.1:80").is_err());
        assert_eq!(
            parse_http_base("http://127.0.0.1:8081/").ok().as_deref(),
            Some("http://127.0.0.1:8081")
        );
    }

    #[test]
    fn builds_urls() {
        let t = Target::parse_ws("ws://127.0.0.1:8080").expect("valid");
        assert_eq!(t.ws_url("s1", None), "ws://127.0.0.1:8080/ws?session=s1");
        let t = Target::parse_ws("ws://127.0.0.1:8080/ws?token=a").expect("valid");
        let last = Offset { ms: 5, seq: 2 };
        assert_eq!(
            t.ws_url("s1", Some(last)),
            "ws://127.0.0.1:8080/ws?token=a&session=s1&last=5-2"
        );
        assert_eq!(t.http_base(), "http://127.0.0.1:8080");
        assert_eq!(
            t.request_path("s1", Some(last)),
            "/ws?token=a&session=s1&last=5-2"
        );
    }

    #[test]
    fn parses_source_ranges() {
        let ips = parse_source_ips(&["127.0.0.2-4,127.0.1.1".into()]).expect("valid");
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], Ipv4Addr::new(127, 0, 1, 1));
        let ips = parse_source_ips(&["127.0.0.250-127.0.1.1".into()]).expect("valid");
        assert_eq!(ips.len(), 8);
        assert!(parse_source_ips(&["10.0.0.1".into()]).is_err());
        assert!(parse_source_ips(&["127.0.0.5-2".into()]).is_err());
    }
}
