//! Sale routes that an earlier route shadows.
//!
//! Routes are tried in order and the first match wins, so a route listed before a sale route
//! takes every request both of them match: a catch-all `/{*rest}` above `POST
//! /api/flash/{sku}/buy` sends every buy to the backend with no reservation. Nothing at run
//! time could tell, so the config is refused when it is compiled (by `check`, `serve` and a
//! reload alike).
//!
//! Two routes overlap when some method is allowed by both (no `method` allows all) and some
//! path is matched by both templates. [`templates_overlap`] decides the path part exactly, by
//! reading each template as the pattern matchit gives it: literal characters; `{param}`, one or
//! more characters other than `/` (so `img-{id}.png` is a prefix, a parameter and a suffix);
//! `{*rest}`, one or more of any character; plus the extra forms `PathTemplate::forms` adds for
//! a trailing catch-all (`/static/{*rest}` also matches `/static/` and `/static`). Two such
//! patterns share a path iff a breadth-first walk over pairs of positions in both reaches the
//! end of both; the characters walked are the shortest shared path, printed as the example.
//!
//! Ordinary routes shadowing ordinary routes are left alone: that is ordinary routing.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use http::Method;
use serde_saphyr::Location;

use super::route::ErrFn;
use super::{ConfigError, PathTemplate, Route};

/// Refuses the first sale route that an earlier route (sale or not) shadows. `at[i]` is where
/// route `i` is defined; the error is reported at the earlier route, and names both lines.
pub(super) fn refuse_shadowed_sales(
    routes: &[Route],
    at: &[Location],
    err: &ErrFn<'_>,
) -> Result<(), ConfigError> {
    let line = |i: usize| at.get(i).map_or(0, Location::line);
    for (j, sale_route) in routes.iter().enumerate() {
        if sale_route.sale.is_none() {
            continue;
        }
        for (i, earlier) in routes[..j].iter().enumerate() {
            let Some(method) = methods_overlap(&earlier.methods, &sale_route.methods) else {
                continue;
            };
            let Some(path) = templates_overlap(&earlier.path.source, &sale_route.path.source)
            else {
                continue;
            };
            let consequence = if earlier.sale.is_some() {
                format!(
                    "such buys would be admitted by the rules of \"{}\", never by those of \"{}\"; \
                     narrow the first route or move the second up",
                    earlier.name, sale_route.name
                )
            } else {
                "every such buy would reach the backend unguarded; move the sale route up".into()
            };
            let kind = if earlier.sale.is_some() {
                "sale route"
            } else {
                "route"
            };
            let message = format!(
                "{kind} \"{}\" (line {}) is listed before sale route \"{}\" (line {}) and \
                 matches some of its requests (e.g. {method} {path}): {consequence}",
                earlier.name,
                line(i),
                sale_route.name,
                line(j),
            );
            let place = at.get(i).copied().unwrap_or(Location::UNKNOWN);
            return Err(err(&place, format!("routes[{i}]"), message));
        }
    }
    Ok(())
}

/// A method both routes allow (an empty list allows every method), preferring `POST`, the
/// method of a buy; `None` if they share none.
fn methods_overlap(earlier: &[Method], sale: &[Method]) -> Option<Method> {
    let allows = |list: &[Method], m: &Method| list.is_empty() || list.contains(m);
    if allows(earlier, &Method::POST) && allows(sale, &Method::POST) {
        return Some(Method::POST);
    }
    let (pick_from, other) = if sale.is_empty() {
        (earlier, sale)
    } else {
        (sale, earlier)
    };
    pick_from.iter().find(|m| allows(other, m)).cloned()
}

/// One piece of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `{param}`: one or more characters other than `/`.
    Param,
    /// `{*rest}`: one or more characters of any kind.
    CatchAll,
}

impl Tok {
    fn repeats_on(self, c: char) -> bool {
        match self {
            Tok::Lit(_) => false,
            Tok::Param => c != '/',
            Tok::CatchAll => true,
        }
    }
}

/// Splits one matchit route into tokens; `{{` and `}}` are literal braces.
fn tokens(form: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut chars = form.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '}' if chars.peek() == Some(&c) => {
                chars.next();
                out.push(Tok::Lit(c));
            }
            '{' => {
                let catch_all = chars.peek() == Some(&'*');
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                }
                out.push(if catch_all { Tok::CatchAll } else { Tok::Param });
            }
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

/// A position in a token list: before token `k`, or inside parameter `k` after at least one
/// character (from where it may take more, or end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pos {
    k: usize,
    inside: bool,
}

/// The positions `p` stands for: inside a parameter, it may also have ended already.
fn closure(p: Pos) -> impl Iterator<Item = Pos> {
    std::iter::once(p).chain(p.inside.then_some(Pos {
        k: p.k + 1,
        inside: false,
    }))
}

fn accepts(toks: &[Tok], p: Pos) -> bool {
    closure(p).any(|q| q.k == toks.len() && !q.inside)
}

/// Where `c` can take position `p`.
fn step(toks: &[Tok], p: Pos, c: char) -> Vec<Pos> {
    let mut out = Vec::new();
    for q in closure(p) {
        let Some(&tok) = toks.get(q.k) else { continue };
        let next = match (q.inside, tok) {
            (true, t) if t.repeats_on(c) => Some(q),
            (false, Tok::Lit(l)) if l == c => Some(Pos {
                k: q.k + 1,
                inside: false,
            }),
            (false, t) if t.repeats_on(c) => Some(Pos {
                k: q.k,
                inside: true,
            }),
            _ => None,
        };
        out.extend(next);
    }
    out
}

/// A path both templates match, the shortest one, or `None` if they share no path.
///
/// The walk only needs the characters the templates spell, `/`, and one character neither
/// spells: every other character moves a template exactly as that one does.
pub fn templates_overlap(a: &str, b: &str) -> Option<String> {
    let forms = |s: &str| -> Vec<Vec<Tok>> {
        PathTemplate::forms(s)
            .into_iter()
            .map(tokens)
            .collect::<Vec<_>>()
    };
    let (fa, fb) = (forms(a), forms(b));
    let mut spelled: Vec<char> = fa
        .iter()
        .chain(&fb)
        .flatten()
        .filter_map(|t| match t {
            Tok::Lit(c) if *c != '/' => Some(*c),
            _ => None,
        })
        .collect();
    spelled.sort_unstable();
    spelled.dedup();
    let fresh = ('x'..='z')
        .chain('a'..='w')
        .chain('0'..='9')
        .find(|c| !spelled.contains(c))
        .unwrap_or('\u{e9}');
    let alphabet: Vec<char> = [fresh, '/'].into_iter().chain(spelled).collect();

    // A node: which form of each template, and the position in each.
    type Node = (usize, Pos, usize, Pos);
    let start = Pos {
        k: 0,
        inside: false,
    };
    let mut came_from: HashMap<Node, Option<(Node, char)>> = HashMap::new();
    let mut queue = VecDeque::new();
    for ia in 0..fa.len() {
        for ib in 0..fb.len() {
            let node = (ia, start, ib, start);
            came_from.insert(node, None);
            queue.push_back(node);
        }
    }
    while let Some(node) = queue.pop_front() {
        let (ia, pa, ib, pb) = node;
        let (ta, tb) = (&fa[ia], &fb[ib]);
        if accepts(ta, pa) && accepts(tb, pb) {
            let mut path = Vec::new();
            let mut at = node;
            while let Some(Some((prev, c))) = came_from.get(&at) {
                path.push(*c);
                at = *prev;
            }
            return Some(path.into_iter().rev().collect());
        }
        for &c in &alphabet {
            for na in step(ta, pa, c) {
                for nb in step(tb, pb, c) {
                    let next = (ia, na, ib, nb);
                    if let Entry::Vacant(e) = came_from.entry(next) {
                        e.insert(Some((node, c)));
                        queue.push_back(next);
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(template: &str, path: &str) -> bool {
        PathTemplate::compile(template)
            .unwrap_or_else(|e| panic!("{e}"))
            .router
            .at(path)
            .is_ok()
    }

    /// (earlier, later, the shortest shared path or `None`).
    const PAIRS: &[(&str, &str, Option<&str>)] = &[
        // Catch-alls.
        ("/{*rest}", "/api/flash/{sku}/buy", Some("/api/flash/x/buy")),
        (
            "/api/{*rest}",
            "/api/flash/{sku}/buy",
            Some("/api/flash/x/buy"),
        ),
        ("/shop/{*rest}", "/api/flash/{sku}/buy", None),
        ("/api/{*rest}", "/api", Some("/api")),
        ("/api/{*rest}", "/apix", None),
        ("/api/{*rest}", "/api/{x}", Some("/api/x")),
        ("/{*rest}", "/", Some("/")),
        ("/{*a}", "/{*b}", Some("/")),
        ("/shop/{*rest}", "/api/{*rest}", None),
        (
            "/api/v1/{*rest}",
            "/api/{ver}/orders",
            Some("/api/v1/orders"),
        ),
        ("/{a}/{*rest}", "/b", Some("/b")),
        ("/a/{*rest}", "/a{x}", None),
        // Catch-all with a prefix inside its segment (matchit accepts it; no extra forms).
        ("/files/x{*rest}", "/files/xyz", Some("/files/xyz")),
        ("/files/x{*rest}", "/files/x", None),
        ("/files/x{*rest}", "/files/{name}", Some("/files/xy")),
        // Parameters.
        (
            "/api/flash/{sku}/buy",
            "/api/flash/{id}/buy",
            Some("/api/flash/x/buy"),
        ),
        (
            "/api/flash/{sku}/{action}",
            "/api/flash/{sku}/buy",
            Some("/api/flash/x/buy"),
        ),
        (
            "/api/flash/special/buy",
            "/api/flash/{sku}/buy",
            Some("/api/flash/special/buy"),
        ),
        ("/api/flash/{sku}", "/api/flash/{sku}/buy", None),
        ("/api/{x}", "/api", None),
        ("/{x}", "/", None),
        ("/a/b/c", "/{x}/{y}", None),
        ("/{x}/{y}", "/a/b", Some("/a/b")),
        // Literals: equal or not; case matters; root.
        ("/", "/", Some("/")),
        ("/api/flash/a/buy", "/api/flash/b/buy", None),
        (
            "/api/flash/a/buy",
            "/api/flash/a/buy",
            Some("/api/flash/a/buy"),
        ),
        ("/API/{x}", "/api/{x}", None),
        ("/api/buy", "/api/buy/now", None),
        // A parameter as part of a segment.
        (
            "/images/{id}.png",
            "/images/logo.png",
            Some("/images/logo.png"),
        ),
        ("/images/{id}.png", "/images/{name}", Some("/images/x.png")),
        ("/images/{id}.png", "/images/{name}.jpg", None),
        (
            "/images/img-{id}",
            "/images/{id}.png",
            Some("/images/img-.png"),
        ),
        ("/images/img-{id}", "/images/pic-{id}", None),
        ("/images/img-{id}", "/images/img-", None),
        ("/v{n}/buy", "/v1/buy", Some("/v1/buy")),
        // Escaped braces are literals.
        ("/{{literal}}", "/{x}", Some("/{literal}")),
        ("/{{literal}}", "/other", None),
    ];

    #[test]
    fn overlap_table() {
        let mut failures = Vec::new();
        for &(a, b, want) in PAIRS {
            for (x, y) in [(a, b), (b, a)] {
                let got = templates_overlap(x, y);
                if got.as_deref() != want {
                    failures.push(format!("{x} vs {y}: got {got:?}, want {want:?}"));
                }
                if let Some(path) = &got
                    && !(matches(x, path) && matches(y, path))
                {
                    failures.push(format!("{x} vs {y}: matchit does not match {path} on both"));
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    /// Where the table says "no shared path", no path built from either template is matched by
    /// both (parameters filled with values that could trip a sloppy comparison).
    #[test]
    fn disjoint_pairs_share_no_probe_path() {
        let fills = [
            "x", "a", "b", "y", "buy", "png", "x.png", "img-x", "pic-x", "v1", "x/y", "lit",
        ];
        for &(a, b, want) in PAIRS {
            if want.is_some() {
                continue;
            }
            for template in [a, b] {
                for form in PathTemplate::forms(template) {
                    for fill in fills {
                        let probe = fill_params(form, fill);
                        assert!(
                            !(matches(a, &probe) && matches(b, &probe)),
                            "{a} and {b} both match {probe}"
                        );
                    }
                }
            }
        }
    }

    fn fill_params(form: &str, fill: &str) -> String {
        tokens(form)
            .into_iter()
            .map(|t| match t {
                Tok::Lit(c) => c.to_string(),
                Tok::Param | Tok::CatchAll => fill.to_owned(),
            })
            .collect()
    }

    #[test]
    fn methods() {
        let (get, post, put) = (Method::GET, Method::POST, Method::PUT);
        let one = |m: &Method| vec![m.clone()];
        assert_eq!(methods_overlap(&[], &[]), Some(post.clone()));
        assert_eq!(methods_overlap(&[], &one(&put)), Some(put.clone()));
        assert_eq!(methods_overlap(&one(&get), &[]), Some(get.clone()));
        assert_eq!(methods_overlap(&one(&get), &one(&post)), None);
        assert_eq!(
            methods_overlap(&[get, put.clone()], &[post, put.clone()]),
            Some(put)
        );
    }

    fn compile(yaml: &str) -> Result<super::super::Config, ConfigError> {
        super::super::parse(yaml, "t.yaml")
    }

    const HEAD: &str = "upstream: { url: \"http://127.0.0.1:3000\" }\nroutes:\n";
    const SALE: &str = "  - name: flash-buy\n    match: { method: POST, path: \"/api/flash/{sku}/buy\" }\n    identity: { header: X-User-Id }\n    sale: { sku: { path_param: sku } }\n";

    #[test]
    fn catch_all_before_a_sale_route_is_refused_with_both_lines() {
        let yaml = format!(
            "{HEAD}  - name: everything-else\n    match: {{ path: \"/{{*rest}}\" }}\n{SALE}"
        );
        let e = compile(&yaml).unwrap_err();
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (3, 5, "routes[0]"),
            "{e}"
        );
        assert_eq!(
            e.message,
            "route \"everything-else\" (line 3) is listed before sale route \"flash-buy\" \
             (line 5) and matches some of its requests (e.g. POST /api/flash/x/buy): every \
             such buy would reach the backend unguarded; move the sale route up"
        );
    }

    #[test]
    fn a_sale_route_shadowing_a_sale_route_is_refused() {
        let first = SALE
            .replace("flash-buy", "first")
            .replace("/buy", "/{action}");
        let e = compile(&format!("{HEAD}{first}{SALE}")).unwrap_err();
        assert!(
            e.message.starts_with("sale route \"first\" (line 3)"),
            "{e}"
        );
        assert!(e.message.contains("POST /api/flash/x/buy"), "{e}");
    }

    #[test]
    fn harmless_orders_are_accepted() {
        for earlier in [
            // Another method on the same path.
            "  - name: page\n    match: { method: GET, path: \"/api/flash/{sku}/buy\" }\n",
            // A disjoint path.
            "  - name: shop\n    match: { path: \"/shop/{*rest}\" }\n",
        ] {
            let catch_all_after = "  - name: rest\n    match: { path: \"/{*rest}\" }\n";
            let yaml = format!("{HEAD}{earlier}{SALE}{catch_all_after}");
            if let Err(e) = compile(&yaml) {
                panic!("{e}\n{yaml}");
            }
        }
        // Ordinary routes may shadow ordinary routes.
        let yaml = format!(
            "{HEAD}  - name: all\n    match: {{ path: \"/{{*rest}}\" }}\n  - name: api\n    match: {{ path: \"/api/{{*rest}}\" }}\n"
        );
        assert!(compile(&yaml).is_ok());
    }
}
