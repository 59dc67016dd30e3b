//! One token bucket of `limits` (`route`, `per_ip`, `per_user`): its rate and burst, and its
//! scope: local to this instance (the default), or `scope: global`, also enforced across every
//! instance sharing the store, with what to do when the store cannot answer
//! (`on_store_error`: `closed` by default on a sale route, `open` elsewhere).

use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::raw::{RawRate, RawScope};
use super::{ConfigError, DEFAULT_MAX_KEYS, OnStoreError, Rate};

/// Compiles one bucket written at `raw.referenced`. `err` takes the key's suffix below the
/// bucket (`""` for the bucket itself, `".on_store_error"`) so each error names its own key.
pub(super) fn compile_rate(
    raw: Spanned<RawRate>,
    on_sale: bool,
    err: &dyn Fn(&Location, &str, String) -> ConfigError,
) -> Result<Rate, ConfigError> {
    let at = raw.referenced;
    let raw = raw.value;
    let (per, window) = match (raw.per_second, raw.per_minute) {
        (Some(n), None) => (n, Duration::from_secs(1)),
        (None, Some(n)) => (n, Duration::from_secs(60)),
        _ => {
            return Err(err(
                &at,
                "",
                "set exactly one of `per_second` or `per_minute`".into(),
            ));
        }
    };
    let scope = raw.scope.as_ref().map_or(RawScope::Local, |s| s.value);
    let global = match (scope, raw.on_store_error) {
        (RawScope::Global, Some(on_error)) => Some(on_error.value),
        (RawScope::Global, None) if on_sale => Some(OnStoreError::Closed),
        (RawScope::Global, None) => Some(OnStoreError::Open),
        (RawScope::Local, None) => None,
        (RawScope::Local, Some(on_error)) => {
            return Err(err(
                &on_error.referenced,
                ".on_store_error",
                "applies to `scope: global` only (a local bucket never asks the store)".into(),
            ));
        }
    };
    Ok(Rate {
        period: window / per.get(),
        burst: raw.burst.unwrap_or(per),
        max_keys: raw.max_keys.map(|n| n.get()).unwrap_or(DEFAULT_MAX_KEYS),
        global,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Limits, OnStoreError, parse};
    use std::time::Duration;

    /// Parses one route with `limits` (and a sale when `sale`), giving its limits or the error.
    fn limits(limits: &str, sale: bool) -> Result<Limits, String> {
        let sale = if sale {
            "    sale: { sku: { path_param: sku } }\n"
        } else {
            ""
        };
        let yaml = format!(
            "upstream: {{ url: \"http://127.0.0.1:3000\" }}\n\
             routes:\n\
             \x20 - name: buy\n\
             \x20   match: {{ method: POST, path: \"/api/{{sku}}/buy\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   limits:\n{limits}{sale}"
        );
        parse(&yaml, "t.yaml")
            .map(|c| c.routes[0].limits.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rate_and_window() {
        let l = limits("      route: { per_second: 2, burst: 5 }\n", false).unwrap();
        let r = l.route.unwrap();
        assert_eq!(r.period, Duration::from_millis(500));
        assert_eq!(r.window_secs(), 3);
        assert_eq!(r.global, None, "local is the default");
        let l = limits("      per_ip: { per_minute: 30 }\n", false).unwrap();
        let r = l.per_ip.unwrap();
        assert_eq!((r.period, r.burst.get()), (Duration::from_secs(2), 30));
    }

    #[test]
    fn global_scope_fails_closed_on_a_sale_route_and_open_elsewhere_by_default() {
        let text = "      per_user: { per_second: 1, burst: 1, scope: global }\n";
        let on_sale = limits(text, true).unwrap().per_user.unwrap();
        assert_eq!(on_sale.global, Some(OnStoreError::Closed));
        let ordinary = limits(text, false).unwrap().per_user.unwrap();
        assert_eq!(ordinary.global, Some(OnStoreError::Open));
        let local = limits("      per_user: { per_second: 1, scope: local }\n", true).unwrap();
        assert_eq!(local.per_user.unwrap().global, None);
    }

    #[test]
    fn on_store_error_is_the_operators_choice() {
        let open = limits(
            "      route: { per_second: 9, scope: global, on_store_error: open }\n",
            true,
        )
        .unwrap();
        assert_eq!(open.route.unwrap().global, Some(OnStoreError::Open));
        let closed = limits(
            "      per_ip: { per_second: 9, scope: global, on_store_error: closed }\n",
            false,
        )
        .unwrap();
        assert_eq!(closed.per_ip.unwrap().global, Some(OnStoreError::Closed));
    }

    #[test]
    fn bad_scope_and_on_store_error_are_located() {
        let e = limits("      route: { per_second: 9, scope: galaxy }\n", false).unwrap_err();
        assert!(e.starts_with("t.yaml:7:"), "{e}");
        assert!(e.contains("routes[0].limits.route.scope: "), "{e}");
        assert!(e.contains("unknown variant `galaxy`"), "{e}");
        let e = limits(
            "      route: { per_second: 9, scope: global, on_store_error: maybe }\n",
            false,
        )
        .unwrap_err();
        assert!(e.contains("routes[0].limits.route.on_store_error: "), "{e}");
        assert!(e.contains("unknown variant `maybe`"), "{e}");
        let e = limits(
            "      per_ip: { per_second: 9, on_store_error: open }\n",
            false,
        )
        .unwrap_err();
        assert!(e.starts_with("t.yaml:7:"), "{e}");
        assert!(
            e.contains("routes[0].limits.per_ip.on_store_error: "),
            "{e}"
        );
        assert!(e.contains("applies to `scope: global` only"), "{e}");
    }
}
