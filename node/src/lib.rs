//! Fanout: a realtime message broker that speaks PocketBase's realtime
//! protocol (Server-Sent Events) and clusters over Redis.
//!
//! Where to look:
//! * [`protocol`]: the wire format (ids, SSE frames, topic keys and options);
//! * [`hub`]: this node's client registry, topic index and fan-out;
//!   `closing`: mass closes spread over `--close-spread`;
//! * [`client`]: one client's queue, subscriptions, store and auth;
//! * [`relay`]: how publications reach every node's hub: the in-process
//!   relay, and the cluster relay over Redis (`relay::redis`);
//! * [`broker`]: hub + relay, the library's entry point;
//! * [`http`] and [`sse`]: the HTTP routes and the stream body; [`bind`]:
//!   request bodies bound as PocketBase binds them;
//! * [`pocketbase`]: companion mode, identities verified by PocketBase and
//!   bridges onto its realtime API;
//! * [`server`]: listener, startup and graceful shutdown; `conn`: each
//!   accepted connection (the SSE fast path, hyper for the rest).

pub mod admission;
pub mod auth;
pub mod bind;
pub mod broker;
pub mod client;
mod closing;
pub mod config;
mod conn;
pub mod error;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod pocketbase;
pub mod protocol;
pub mod realip;
pub mod relay;
pub mod server;
pub mod sse;

pub use broker::{Broker, SubscribeRequest};
pub use client::{Client, Message, SendError};
pub use config::Config;
pub use error::ApiError;
pub use hub::{Audience, Hub, HubConfig};
pub use relay::{Publication, Relay, RelayError};
pub use server::Server;
