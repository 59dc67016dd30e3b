//! Placeholder until the real redis-server spawner lands.
