//! The waiting room's pre-queue is fair: hammering it gains nothing (the fairness test, with
//! its statistical bound stated there). The orders themselves (`queueing: random`, the
//! shuffle at the start) are told in `tests/room.rs`.
//!
//! Every story runs on the embedded store and on a private `redis-server`; every loop is
//! bounded in count and time.
mod support;

use std::time::{Duration, Instant};

use support::room::{Visit, Visitor, prequeue, room_config};
use support::shop::StoreFixture;
use support::*;

/// One story of this file at a time: the fairness run needs the machine's two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `ln C(n, k)`.
fn ln_choose(n: u64, k: u64) -> f64 {
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

/// `P(X >= t)` for X hypergeometric: `draws` drawn without replacement from `total`, of which
/// `marked` are marked.
fn hypergeometric_tail(total: u64, marked: u64, draws: u64, t: u64) -> f64 {
    let all = ln_choose(total, draws);
    (t..=draws.min(marked))
        .map(|k| (ln_choose(marked, k) + ln_choose(total - marked, draws - k) - all).exp())
        .sum()
}

/// The fairness test. 1,000 visitors arrive over a 2-second pre-queue window; 100 of
/// them are bots, which arrive FIRST (the earliest 100: the worst case, what a bot farm does)
/// and then poll every 200 ms, 50 times as often as a human (every 10 s: a human asks on
/// arrival and once more at a random moment of the 2 s after the start), before and after the
/// start (5 s after the first arrival): up to 40 requests each in the 8 s of the run against a
/// human's 2. (On a loaded
/// machine the bots manage fewer polls than that; the test checks they still sent at least 5
/// times as many requests per head as the humans, and prints what they managed.) With 100 sessions and a pace that does not bind, the first 100 admissions are the
/// first 100 places of the shuffled queue, whoever polls most.
///
/// The bound: if admission ignores arrival time and polling, the number of bots among the first
/// 100 admissions is hypergeometric (1,000 visitors, 100 bots, 100 drawn), mean 10. The test
/// fails if it reaches `t`, the smallest count with `P(X >= t) < 0.001` under that law (t = 21
/// here; computed below, not hard-coded): a fair room fails this test less than once in a
/// thousand runs. Without the shuffle (FIFO by arrival) the bots would take all 100; a room
/// that let in whoever asks first after the start would give the bots far more than 20.
async fn hammering_the_prequeue_gains_nothing(store: StoreFixture) {
    use std::sync::{Arc, Mutex};
    const VISITORS: usize = 1000;
    const BOTS: usize = 100;
    let _one_at_a_time = HEAVY.lock().await;
    let backend = Backend::start_echo().await;
    let (window, opens) = prequeue(Duration::from_secs(5));
    let room = format!(
        "      total_active: 100\n      new_per_minute: 60000\n      session_duration: 60s\n{window}"
    );
    let fg = Arc::new(Flashgate::start(&room_config(&backend, &store.yaml, &room)).await);
    let c = client();
    // At most 64 requests at once: the client's connections stay few.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let admitted = Arc::new(Mutex::new(Vec::<usize>::new()));
    let requests = Arc::new([0u64; 2].map(std::sync::atomic::AtomicU64::new));
    let arrivals_from = Instant::now();
    let stop_at = opens + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for i in 0..VISITORS {
        let (c, fg, gate, admitted, requests) = (
            c.clone(),
            fg.clone(),
            gate.clone(),
            admitted.clone(),
            requests.clone(),
        );
        let bot = i < BOTS;
        tasks.push(tokio::spawn(async move {
            let mut v = Visitor::default();
            tokio::time::sleep_until((arrivals_from + Duration::from_millis(2 * i as u64)).into())
                .await;
            let every = if bot {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(10)
            };
            let mut first = true;
            // Bounded: a bot asks at most (8 s / 200 ms) + 1 times, a human 3 times.
            while Instant::now() < stop_at {
                let answer = {
                    let _permit = gate.acquire().await.unwrap();
                    v.visit(&c, &fg).await
                };
                requests[usize::from(!bot)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if answer == Visit::Passed {
                    assert!(Instant::now() >= opens, "let in during the pre-queue");
                    admitted.lock().unwrap().push(i);
                    return;
                }
                // A human comes back at a random moment of the 2 s after the start.
                let next = if !bot && first {
                    opens + Duration::from_millis(rand::random_range(0..2000))
                } else {
                    Instant::now() + every
                };
                first = false;
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.lock().unwrap().clone();
    let [bot_asks, human_asks] =
        [0, 1].map(|i| requests[i].load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(admitted.len(), 100, "exactly the 100 sessions were filled");
    let bots_in = admitted.iter().filter(|i| **i < BOTS).count() as u64;
    let t = (0..=100u64)
        .find(|t| hypergeometric_tail(VISITORS as u64, BOTS as u64, 100, *t) < 0.001)
        .unwrap();
    eprintln!(
        "bots: {bots_in} of the first 100 admissions (10% of arrivals; refused at {t}); \
         requests per bot {:.1}, per human {:.1}",
        bot_asks as f64 / BOTS as f64,
        human_asks as f64 / (VISITORS - BOTS) as f64
    );
    assert!(
        bot_asks as f64 / BOTS as f64 >= 5.0 * human_asks as f64 / (VISITORS - BOTS) as f64,
        "the bots did hammer ({bot_asks} vs {human_asks} requests)"
    );
    assert!(
        bots_in < t,
        "bots took {bots_in} of the first 100 admissions (bound {t})"
    );
}

on_each_store!(hammering_the_prequeue_gains_nothing);

#[test]
fn the_bound_is_the_hypergeometric_tail() {
    // Sanity of the arithmetic: the tail from 0 is 1, and the bound sits where it should.
    let p0 = hypergeometric_tail(1000, 100, 100, 0);
    assert!((p0 - 1.0).abs() < 1e-9, "{p0}");
    assert!(hypergeometric_tail(1000, 100, 100, 21) < 0.001);
    assert!(hypergeometric_tail(1000, 100, 100, 20) >= 0.001);
}
