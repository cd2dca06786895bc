//! The relay: the server that devices of a space upload their changes to and download the
//! space's change log from.
//!
//! Owns: the relay's durable state (`store`). Must not touch the device's store or its socket.

pub mod store;
