//! The Prometheus text format (0.0.4) made from prometheus-client's OpenMetrics encoding, for
//! scrapers that ask for it.

use std::collections::HashSet;

/// OpenMetrics text → Prometheus text 0.0.4. The two differ, for what is exported here, in
/// the family name of a counter (`# TYPE x counter` with samples `x_total` becomes
/// `# TYPE x_total counter`) and in the closing `# EOF`.
pub(super) fn openmetrics_to_text(om: &str) -> String {
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|p| Some((*p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push_str(&rest[name.len()..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
