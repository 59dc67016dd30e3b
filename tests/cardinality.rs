//! Memory under hostile cardinality: a flood of distinct user ids and client IPs must not grow
//! the keyed limiters (per-user, per-IP) past `max_keys`, and once the flood's buckets have
//! refilled, `evict_idle()` gives the keys (and most of the memory) back.
//!
//! The million-key run is `#[ignore]`d (it wants a release build):
//! `bench/cardinality.sh` runs it and prints the figures. A smaller run of the same story is
//! part of the normal suite.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use flashgate::config::{Limits, Rate};
use flashgate::limit::RouteGuards;

/// Resident memory of this process, in KiB (`VmRSS` in /proc/self/status).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Per-user and per-IP buckets of `per_second`, burst 1, each remembering at most `max_keys`.
fn guards(per_second: u32, max_keys: usize) -> RouteGuards {
    let rate = Rate {
        period: Duration::from_secs(1) / per_second,
        burst: NonZeroU32::new(1).unwrap(),
        max_keys,
        global: None,
    };
    RouteGuards::new(&Limits {
        per_ip: Some(rate),
        per_user: Some(rate),
        ..Limits::default()
    })
}

/// The `i`th distinct client address: IPv4 for even `i`, IPv6 for odd.
fn ip(i: u64) -> IpAddr {
    if i.is_multiple_of(2) {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32.wrapping_add((i / 2) as u32)))
    } else {
        IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)))
    }
}

struct Figures {
    keys: u64,
    max_keys: usize,
    took: Duration,
    peak_counts: (usize, usize),
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
}

/// Sends `keys` distinct users and IPs through one route's guards (each seen once: every
/// check passes, as for a fresh key), checks the key counts never pass `max_keys`, then
/// waits for the buckets to refill and evicts.
async fn flood(keys: u64, max_keys: usize) -> Figures {
    // 1,000 tokens a second, burst 1: a bucket is full again 1 ms after its last use.
    let g = guards(1000, max_keys);
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut peak_counts = (0, 0);
    for i in 0..keys {
        let user = format!("user-{i:016x}");
        assert!(g.check_user(&user).is_ok(), "a fresh user is limited");
        assert!(g.check_ip(ip(i)).is_ok(), "a fresh IP is limited");
        if i.is_multiple_of(10_000) || i == keys - 1 {
            let (ips, users) = g.key_counts();
            assert!(
                ips <= max_keys && users <= max_keys,
                "{ips} IPs, {users} users"
            );
            peak_counts = (peak_counts.0.max(ips), peak_counts.1.max(users));
        }
    }
    let took = started.elapsed();
    let rss_peak = rss_kib();
    assert_eq!(
        g.key_counts(),
        (max_keys, max_keys),
        "the tables filled up to the cap and no further"
    );

    // The flood's buckets refill within 1 ms: eviction empties both tables.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        g.evict_idle();
        if g.key_counts() == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys left after eviction: {:?}",
            g.key_counts()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rss_after = rss_kib();
    Figures {
        keys,
        max_keys,
        took,
        peak_counts,
        rss_before,
        rss_peak,
        rss_after,
    }
}

fn print(f: &Figures) {
    println!(
        "cardinality: {} distinct users + {} distinct IPs in {:.2?} ({:.0} checks/s); max_keys {}; \
         peak keys (ip, user) {:?}; RSS KiB before {} / at peak {} (+{}) / after evict_idle {} (+{})",
        f.keys,
        f.keys,
        f.took,
        (2 * f.keys) as f64 / f.took.as_secs_f64(),
        f.max_keys,
        f.peak_counts,
        f.rss_before,
        f.rss_peak,
        f.rss_peak.saturating_sub(f.rss_before),
        f.rss_after,
        f.rss_after.saturating_sub(f.rss_before),
    );
}

/// 1,000,000 distinct users and IPs against the default cap of 100,000 keys per table.
#[tokio::test]
#[ignore = "a million keys: run with bench/cardinality.sh (release build)"]
async fn a_million_distinct_users_and_ips_stay_capped() {
    let f = flood(1_000_000, 100_000).await;
    print(&f);
    // 2 tables x 100,000 keys of 24 bytes plus the map's overhead: tens of MiB, not hundreds.
    let grew = f.rss_peak.saturating_sub(f.rss_before);
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB for 200,000 keys");
    assert!(
        f.rss_after < f.rss_peak,
        "no memory came back after eviction"
    );
}

/// The same story at a size the debug suite runs in a second: 50,000 keys against a cap of
/// 5,000.
#[tokio::test]
async fn distinct_users_and_ips_stay_capped_and_are_evicted() {
    let f = flood(50_000, 5_000).await;
    print(&f);
    let grew = f.rss_peak.saturating_sub(f.rss_before);
    assert!(grew < 16 * 1024, "RSS grew by {grew} KiB for 10,000 keys");
}
