//! Pod IPs: every pod gets its own loopback address from 127.1.0.0/16.
//!
//! Linux routes all of 127.0.0.0/8 to `lo` without configuration, so each pod can listen on
//! 8443 as it would in its own network namespace, and the controller scrapes
//! `https://<podIP>:8443/metrics` exactly as on a cluster. Addresses are handed out round-robin
//! (as host-local IPAM does) so a just-released address is not immediately reused by the next
//! pod while a client may still be talking to the old one. Loopback is shared by everything on
//! the host — another `cdi serve`, its pods — so each agent starts its round at a random
//! point and skips addresses whose pod ports something else already listens on.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// First address of the pod range (127.1.0.0/16; .0.0 itself is skipped).
pub const POD_RANGE_START: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);
/// Last address of the pod range (127.1.255.255 is skipped: a broadcast look-alike).
pub const POD_RANGE_END: Ipv4Addr = Ipv4Addr::new(127, 1, 255, 254);
/// The node's own address, reported as `status.hostIP`.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Every address of the range is held by a live pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no free pod address left in 127.1.0.0/16")]
pub struct AddressesExhausted;

/// Which live pod holds which address.
#[derive(Debug)]
pub struct IpAllocator {
    by_ip: HashMap<Ipv4Addr, String>,
    by_uid: HashMap<String, Ipv4Addr>,
    next: u32,
}

impl Default for IpAllocator {
    fn default() -> Self {
        IpAllocator {
            by_ip: HashMap::new(),
            by_uid: HashMap::new(),
            next: u32::from(POD_RANGE_START),
        }
    }
}

/// Whether `ip` lies in the pod range.
pub fn in_pod_range(ip: Ipv4Addr) -> bool {
    (POD_RANGE_START..=POD_RANGE_END).contains(&ip)
}

/// Whether nothing on this host listens on `ip` at any of `ports` (each is bound and released
/// at once; a pod's own ports are what would collide).
pub fn ports_free(ip: Ipv4Addr, ports: &[u16]) -> bool {
    ports
        .iter()
        .all(|p| std::net::TcpListener::bind((ip, *p)).is_ok())
}

impl IpAllocator {
    /// An allocator whose first round starts `offset` addresses into the range (agents pick it
    /// at random so two of them on one host rarely probe the same addresses first).
    pub fn starting_at(offset: u32) -> Self {
        let (start, end) = (u32::from(POD_RANGE_START), u32::from(POD_RANGE_END));
        IpAllocator {
            next: start + offset % (end - start + 1),
            ..IpAllocator::default()
        }
    }

    /// The address of pod `uid`: the one it holds, else `preferred` (its recorded
    /// `status.podIP`, kept across agent restarts) when in range and not held, else the next
    /// address that is neither held nor taken on the host (`usable`).
    pub fn allocate(
        &mut self,
        uid: &str,
        preferred: Option<Ipv4Addr>,
        usable: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr, AddressesExhausted> {
        if let Some(ip) = self.by_uid.get(uid) {
            return Ok(*ip);
        }
        if let Some(ip) = preferred.filter(|ip| in_pod_range(*ip) && !self.by_ip.contains_key(ip)) {
            self.hold(uid, ip);
            return Ok(ip);
        }
        let (start, end) = (u32::from(POD_RANGE_START), u32::from(POD_RANGE_END));
        let size = end - start + 1;
        for i in 0..size {
            let ip = Ipv4Addr::from(start + (self.next - start + i) % size);
            if !self.by_ip.contains_key(&ip) && usable(ip) {
                self.next = start + (u32::from(ip) - start + 1) % size;
                self.hold(uid, ip);
                return Ok(ip);
            }
        }
        Err(AddressesExhausted)
    }

    fn hold(&mut self, uid: &str, ip: Ipv4Addr) {
        self.by_ip.insert(ip, uid.to_string());
        self.by_uid.insert(uid.to_string(), ip);
    }

    /// Give pod `uid`'s address back (idempotent).
    pub fn release(&mut self, uid: &str) {
        if let Some(ip) = self.by_uid.remove(uid) {
            self.by_ip.remove(&ip);
        }
    }

    /// Number of addresses held.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: Ipv4Addr) -> bool {
        true
    }

    #[test]
    fn addresses_taken_on_the_host_are_skipped() {
        // Something else (another agent's pod) listens on the first candidate's port.
        let taken = std::net::TcpListener::bind((POD_RANGE_START, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        assert!(!ports_free(POD_RANGE_START, &[port]));
        let mut a = IpAllocator::default();
        let ip = a.allocate("x", None, |ip| ports_free(ip, &[port])).unwrap();
        assert_eq!(ip, Ipv4Addr::new(127, 1, 0, 2));
        let b = IpAllocator::starting_at(10);
        assert_eq!(b.next, u32::from(Ipv4Addr::new(127, 1, 0, 11)));
    }

    #[test]
    fn addresses_are_unique_sticky_and_round_robin() {
        let mut a = IpAllocator::default();
        let x = a.allocate("x", None, any).unwrap();
        assert_eq!(x, Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(a.allocate("x", None, any).unwrap(), x, "sticky per pod");
        let y = a.allocate("y", Some(x), any).unwrap();
        assert_ne!(y, x, "a held address is never given twice");
        a.release("x");
        let z = a.allocate("z", None, any).unwrap();
        assert_ne!(
            z, x,
            "round-robin: the released address is not reused at once"
        );
        assert_eq!(a.len(), 2);
        // A pod restarting with the agent keeps its recorded address.
        let kept = Ipv4Addr::new(127, 1, 3, 4);
        assert_eq!(a.allocate("w", Some(kept), any).unwrap(), kept);
        // Out-of-range recorded addresses are not honoured.
        let v = a
            .allocate("v", Some(Ipv4Addr::new(10, 0, 0, 1)), any)
            .unwrap();
        assert!(in_pod_range(v));
        a.release("nobody");
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn exhaustion_is_an_error_and_wraps_around() {
        let mut a = IpAllocator::default();
        let size = u32::from(POD_RANGE_END) - u32::from(POD_RANGE_START) + 1;
        for i in 0..size {
            a.allocate(&i.to_string(), None, any).unwrap();
        }
        assert_eq!(a.allocate("one-more", None, any), Err(AddressesExhausted));
        a.release("5");
        assert_eq!(
            a.allocate("one-more", None, any).unwrap(),
            Ipv4Addr::from(u32::from(POD_RANGE_START) + 5)
        );
    }
}
