//! The instance's totals across routes, read from the same prometheus-client handles a scrape
//! encodes (no second set of counters to keep in step): what the dashboard's event stream
//! turns into rates. Reading never creates a series, so `/metrics` shows exactly what it
//! showed before anyone watched.

use super::{Metrics, OUTCOMES, RouteLabel, RouteOutcome, RouteStatus};

/// Counters and gauges summed over every route this instance has had (a route dropped by a
/// reload keeps counting what it counted, so a difference of two readings is never negative).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// `flashgate_admissions_total` per outcome, in [`OUTCOMES`] order.
    pub admissions: [u64; OUTCOMES.len()],
    /// `flashgate_requests_total{status="429"}`, all routes.
    pub answered_429: u64,
    /// `flashgate_requests_total{status="503"}`, all routes.
    pub answered_503: u64,
    /// `flashgate_in_flight`, all routes.
    pub in_flight: i64,
    /// `flashgate_connections`.
    pub connections: i64,
    /// `flashgate_breaker_open`.
    pub breaker_open: bool,
}

impl Metrics {
    /// Remembers a route name (called by [`Metrics::route`]; a reload names the same routes
    /// again, so each is kept once).
    pub(super) fn note_route(&self, name: &str, sale: bool) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        match routes.iter_mut().find(|(n, _)| n == name) {
            // A route that was ever a sale route keeps its admission counters.
            Some((_, was_sale)) => *was_sale |= sale,
            None => routes.push((name.to_owned(), sale)),
        }
    }

    /// The totals now.
    pub fn totals(&self) -> Totals {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut t = Totals {
            connections: self.connections.get(),
            breaker_open: self.breaker_open.get() != 0,
            ..Totals::default()
        };
        let answered = |route: &str, status: u16| {
            let key = RouteStatus {
                route: route.to_owned(),
                status,
            };
            self.requests.get(&key).map_or(0, |c| c.get())
        };
        // `(unmatched)` is among them once a request matched no route.
        for (name, _) in &routes {
            t.answered_429 += answered(name, 429);
            t.answered_503 += answered(name, 503);
            let label = RouteLabel {
                route: name.to_owned(),
            };
            t.in_flight += self.in_flight.get(&label).map_or(0, |g| g.get());
        }
        for (name, _) in routes.iter().filter(|(_, sale)| *sale) {
            for (total, outcome) in t.admissions.iter_mut().zip(OUTCOMES) {
                let key = RouteOutcome {
                    route: name.clone(),
                    outcome,
                };
                *total += self.admissions.get(&key).map_or(0, |c| c.get());
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn totals_sum_every_route_and_create_no_series() {
        let m = Metrics::new();
        let before = m.encode_text();
        assert_eq!(m.totals(), Totals::default());
        assert_eq!(m.encode_text(), before, "reading created a series");
        let buy = m.route("buy", true);
        let buy_again = m.route("buy", true); // a reload
        let pages = m.route("pages", false);
        buy.admission("won");
        buy_again.admission("won");
        buy.admission("sold_out");
        buy.answered(429, Duration::ZERO);
        pages.answered(429, Duration::ZERO);
        pages.answered(503, Duration::ZERO);
        m.unmatched().answered(503, Duration::ZERO);
        let _one = pages.enter();
        m.connections.inc();
        m.breaker_open.set(1);
        let t = m.totals();
        let at = |o: &str| t.admissions[OUTCOMES.iter().position(|x| *x == o).unwrap()];
        assert_eq!((at("won"), at("sold_out"), at("closed")), (2, 1, 0));
        assert_eq!((t.answered_429, t.answered_503), (2, 2));
        assert_eq!((t.in_flight, t.connections, t.breaker_open), (1, 1, true));
        assert!(!m.encode_text().contains("status=\"200\""));
    }
}
