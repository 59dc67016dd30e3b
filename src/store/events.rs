//! What one instance tells the others about a sale, through a shared store: the events
//! ([`StoreEvent`]) and their wire form (`<what> <value> <sku>`, as `lua/*.lua` publish them
//! on `<prefix>:events`).
//!
//! A shared store's writes are published by the store itself (the scripts that change stock,
//! `set_closed.lua`), so an event is sent whichever instance or CLI made the change. Every
//! instance follows the channel (`crate::fleet`) and clears its local sold-out flag at once
//! when stock comes back; the flag's `sold_out_recheck` stays the fallback for a lost message.

use std::fmt;

use super::Sku;

/// One change to a sale, as every instance hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// The stock is now `remaining` (set, add, the last units reserved, units released into
    /// a sold-out sale).
    Stock { sku: Sku, remaining: u64 },
    /// The operator closed or reopened the sale.
    Closed { sku: Sku, closed: bool },
    /// The subscription was (re)established: messages may have been missed while it was
    /// down, so every local flag must be asked again.
    Resync,
}

impl StoreEvent {
    /// Parse a published message; `None` for anything that is not one of ours (the channel
    /// is shared with whoever else can publish on it).
    pub fn parse(payload: &[u8]) -> Option<StoreEvent> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(3, ' ');
        let (what, value, sku) = (parts.next()?, parts.next()?, parts.next()?);
        let sku = Sku::parse(sku).ok()?;
        match what {
            "stock" => Some(StoreEvent::Stock {
                sku,
                remaining: value.parse().ok()?,
            }),
            "closed" => Some(StoreEvent::Closed {
                sku,
                closed: match value {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                },
            }),
            _ => None,
        }
    }
}

/// The wire form, as the scripts write it (`Resync` is never sent).
impl fmt::Display for StoreEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreEvent::Stock { sku, remaining } => write!(f, "stock {remaining} {sku}"),
            StoreEvent::Closed { sku, closed } => write!(f, "closed {} {sku}", u8::from(*closed)),
            StoreEvent::Resync => write!(f, "resync"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(s: &str) -> Sku {
        Sku::parse(s).unwrap()
    }

    #[test]
    fn round_trip() {
        for ev in [
            StoreEvent::Stock {
                sku: sku("a-1"),
                remaining: 0,
            },
            StoreEvent::Stock {
                sku: sku("SKU.9_x"),
                remaining: 9_007_199_254_740_991,
            },
            StoreEvent::Closed {
                sku: sku("a"),
                closed: true,
            },
            StoreEvent::Closed {
                sku: sku("a"),
                closed: false,
            },
        ] {
            assert_eq!(StoreEvent::parse(ev.to_string().as_bytes()), Some(ev));
        }
    }

    #[test]
    fn foreign_or_malformed_messages_are_ignored() {
        for bad in [
            "",
            "stock",
            "stock 5",
            "stock -1 a",
            "stock five a",
            "closed 2 a",
            "opened 1 a",
            "stock 5 bad sku",
            "resync",
            "stock 5 {a}",
        ] {
            assert_eq!(StoreEvent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(StoreEvent::parse(&[0xff, 0xfe]), None);
    }
}
